"""One server process against WORKERS=2 on the same model, measured side by side in one run.

Unary Predict at 32 calls in flight (batch 1, the production-sized LightGBM model of
``bench_server``), from this process over 8 HTTP/2 connections per server (the kernel gives each
connection to one worker, so a client needs several to reach several workers; both servers get
the same 8). The two servers are driven in alternating short slices so that machine noise hits
both alike. Per server: throughput, p50/p99, and the server's CPU per call (user + system CPU
time of all its processes, supervisor included, from /proc, divided by the calls answered),
and calls per core-second (its inverse): what predicts the scaling on a host with spare cores.
The two-worker server is measured again at twice the calls in flight, the per-worker load one
worker has at 32 (its dynamic batching depends on how busy its loop is).

Two-worker servers run pinned (``WORKER_CPU_AFFINITY=auto``: a CPU each) and unpinned
(``off``, the default), side by side. Each row also splits the server's CPU
into the supervisor's and the workers', gives the context switches per call (voluntary /
involuntary, every thread) and the rows per inference (the loop's dynamic batching, from
``/metrics``).

The Python client costs ~120 us of CPU a call on the same 2 cores, so the server's processes
contend with it; when ``h2load`` (Debian's ``nghttp2-client``) is on the PATH the same servers
are driven again by it (gRPC unary over HTTP/2 from a C client using ~30 us a call; every
answer checked against the servers' OK count), which separates that contention from what the
workers cost. Without it that part is skipped with a message.

``python -m bench workers`` (defaults) or ``python -m bench.bench_workers [--seconds S]
[--calls N] [--rounds R] [--baseline TREE]``: 8 s per server with the Python client, 3 rounds
of 30,000 calls per server with h2load; about four minutes in all on this 2-core machine, six
with ``--baseline``, which adds the WORKERS=2 server of another checkout (run from its tree
with this interpreter), e.g. main for a before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from bench.bench_server import REPO, Process, build_model
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2

CONNECTIONS = 8
IN_FLIGHT = 32
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of ``pids`` so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICKS


def usage(pids: Sequence[int]) -> np.ndarray:
    """Per pid: CPU seconds, voluntary and involuntary context switches (every thread)."""
    out = np.zeros((len(pids), 3))
    for row, pid in enumerate(pids):
        out[row, 0] = cpu_seconds([pid])
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that has just ended
                status = (task / "status").read_text()
                out[row, 1] += int(status.split("\nvoluntary_ctxt_switches:", 1)[1].split()[0])
                out[row, 2] += int(status.split("nonvoluntary_ctxt_switches:", 1)[1].split()[0])
    return out


def predict_counters(server: Server) -> np.ndarray:
    """[rows answered, inferences run, Predict calls answered OK], all workers summed."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out = np.zeros(3)
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name == "xylen_predict_rows_total":
            out[0] += float(line.rsplit(" ", 1)[1])
        elif name == "xylen_predict_executions_total":
            out[1] += float(line.rsplit(" ", 1)[1])
        elif (
            name == "rpc_server_requests_total"
            and 'rpc_method="Predict"' in line
            and 'rpc_grpc_status_code="OK"' in line
        ):
            out[2] += float(line.rsplit(" ", 1)[1])
    return out


class Server:
    """A xylen server (one process or a supervisor and its workers) and its processes."""

    def __init__(
        self,
        model_root: Path,
        workers: int,
        data: Path,
        source: Path = REPO,
        extra: dict[str, str] | None = None,
    ) -> None:
        env = dict(
            os.environ,
            MODEL_PATH=str(model_root),
            MODEL_NAME="model_1",
            GRPC_HOST="127.0.0.1",
            GRPC_PORT="0",
            METRICS_PORT="0",
            LOG_LEVEL="WARNING",
            WORKERS=str(workers),
            FEEDBACK_DATA_DIR=str(data),
            RETRAIN_AUTO="false",
        ) | (extra or {})
        self.workers = workers
        self.process = Process(
            [sys.executable, "-m", "xylen_server"], env, "listening on port", source
        )
        assert self.process.proc.stdout is not None
        self.metrics_port = int(self.process.proc.stdout.readline().rsplit(" ", 1)[1])
        self.address = f"127.0.0.1:{self.process.port}"
        self.pids = self._wait_serving()

    def _wait_serving(self) -> list[int]:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{self.metrics_port}/health"
                with urllib.request.urlopen(url, timeout=5) as response:
                    health = json.loads(response.read())
            except OSError:
                time.sleep(0.2)
                continue
            if self.workers == 1:
                return [self.process.proc.pid]
            return [self.process.proc.pid, *(w["pid"] for w in health["workers"])]
        raise RuntimeError(f"server with {self.workers} workers did not become SERVING")

    def stop(self) -> None:
        self.process.stop()


async def _slice(
    stubs: list[pb_grpc.ModelServiceStub],
    request: pb.PredictRequest,
    seconds: float,
    latencies: list[float],
    in_flight: int = IN_FLIGHT,
) -> int:
    done = 0
    stop = time.perf_counter() + seconds

    async def caller(stub: pb_grpc.ModelServiceStub) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await stub.Predict(request)
            latencies.append(time.perf_counter() - started)
            done += 1

    await asyncio.gather(*(caller(stubs[i % len(stubs)]) for i in range(in_flight)))
    return done


def _figures(
    server: Server, calls: float, elapsed: float, used: np.ndarray, counters: np.ndarray
) -> dict[str, float]:
    """What a row prints: ``used`` is :func:`usage`'s difference over the measurement, the
    supervisor first when there is one; ``counters`` :func:`predict_counters`' difference."""
    cpu = float(used[:, 0].sum())
    supervisor = float(used[0, 0]) if server.workers > 1 else 0.0
    return {
        "rps": calls / elapsed,
        "cpu_per_call_us": cpu / calls * 1e6,
        "calls_per_core_second": calls / cpu,
        "cores": cpu / elapsed,
        "supervisor_us": supervisor / calls * 1e6,
        "voluntary": float(used[:, 1].sum()) / calls,
        "involuntary": float(used[:, 2].sum()) / calls,
        "rows_per_inference": float(counters[0] / max(counters[1], 1)),
    }


async def measure(
    servers: dict[str, Server],
    request: pb.PredictRequest,
    seconds: float,
    slice_seconds: float = 0.5,
    in_flight: dict[str, int] | None = None,
) -> dict[str, dict[str, float]]:
    """Each server in turn, in slices, at :data:`IN_FLIGHT` calls in flight (``in_flight`` sets
    another level for a name)."""
    level = {name: (in_flight or {}).get(name, IN_FLIGHT) for name in servers}
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = {
        name: [grpc.aio.insecure_channel(s.address, options=own) for _ in range(CONNECTIONS)]
        for name, s in servers.items()
    }
    stubs = {name: [pb_grpc.ModelServiceStub(c) for c in chans] for name, chans in channels.items()}
    try:
        for name in servers:  # warm every connection
            await _slice(stubs[name], request, 0.5, [], level[name])
        calls = dict.fromkeys(servers, 0)
        elapsed = dict.fromkeys(servers, 0.0)
        used = {name: np.zeros((len(s.pids), 3)) for name, s in servers.items()}
        counters = {name: np.zeros(3) for name in servers}
        latencies: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(max(1, int(seconds / slice_seconds))):
            for name, server in servers.items():
                # the scrape is outside the CPU window (it costs the server CPU of its own)
                counted = predict_counters(server)
                before, started = usage(server.pids), time.perf_counter()
                calls[name] += await _slice(
                    stubs[name], request, slice_seconds, latencies[name], level[name]
                )
                elapsed[name] += time.perf_counter() - started
                used[name] += usage(server.pids) - before
                counters[name] += predict_counters(server) - counted
    finally:
        for chans in channels.values():
            for channel in chans:
                await channel.close()
    out = {}
    for name, server in servers.items():
        values = np.sort(np.asarray(latencies[name]))
        out[name] = _figures(server, calls[name], elapsed[name], used[name], counters[name]) | {
            "p50_us": float(values[len(values) // 2] * 1e6),
            "p99_us": float(values[int(len(values) * 0.99)] * 1e6),
        }
    return out


def grpc_frame(request: pb.PredictRequest) -> bytes:
    """The request as gRPC sends it over HTTP/2: uncompressed flag, length, bytes."""
    data = request.SerializeToString()
    return b"\0" + struct.pack(">I", len(data)) + data


def h2load(
    servers: dict[str, Server],
    request: pb.PredictRequest,
    calls: int,
    rounds: int,
    in_flight: dict[str, int],
) -> dict[str, dict[str, float]]:
    """Each server in turn (``rounds`` times), ``calls`` unary Predicts from ``h2load`` over
    :data:`CONNECTIONS` connections at ``in_flight[name]`` streams in all; medians over the
    rounds. Every answer must be OK: h2load counts HTTP status 200, so the servers' own count
    of OK Predicts has to rise by as many."""
    with tempfile.TemporaryDirectory(prefix="xylen-bench-h2load-") as tmp:
        body = Path(tmp) / "predict.bin"
        body.write_bytes(grpc_frame(request))
        log = Path(tmp) / "requests.tsv"
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for _ in range(rounds):
            for name, server in servers.items():
                command = [
                    "h2load",
                    *("-c", str(CONNECTIONS), "-m", str(in_flight[name] // CONNECTIONS)),
                    *("-H", "content-type: application/grpc", "-H", "te: trailers"),
                    *("-d", str(body), "--log-file", str(log)),
                    f"http://{server.address}/xylen.v1.ModelService/Predict",
                ]
                warm = [*command[:1], "-n", str(max(calls // 10, 1000)), *command[1:]]
                subprocess.run(warm, capture_output=True, check=True, timeout=600)
                counted = predict_counters(server)
                before, started, client = usage(server.pids), time.perf_counter(), os.times()
                done = subprocess.run(
                    [*command[:1], "-n", str(calls), *command[1:]],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=600,
                )
                elapsed = time.perf_counter() - started
                after, client_after = usage(server.pids), os.times()
                counters = predict_counters(server) - counted
                succeeded = re.search(r"(\d+) succeeded", done.stdout)
                answered = int(succeeded.group(1)) if succeeded else 0
                if answered != calls or int(counters[2]) != calls:
                    raise RuntimeError(
                        f"h2load on {name}: {answered} of {calls} answered, "
                        f"{int(counters[2])} OK by the server's count: {done.stdout[-500:]}"
                    )
                micros = np.sort(
                    [int(line.split("\t")[2]) for line in log.read_text().splitlines() if line]
                )
                client_cpu = (client_after.children_user + client_after.children_system) - (
                    client.children_user + client.children_system
                )
                rows[name].append(
                    _figures(server, calls, elapsed, after - before, counters)
                    | {
                        "p50_us": float(micros[len(micros) // 2]),
                        "p99_us": float(micros[int(len(micros) * 0.99)]),
                        "client_us": client_cpu / calls * 1e6,
                    }
                )
    return {
        name: {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
        for name, runs in rows.items()
    }


def report(result: dict[str, dict[str, float]], base_name: str = "1 worker") -> None:
    base = result[base_name]
    for name, r in result.items():
        print(
            f"  {name:<22} {r['rps']:6.0f} calls/s ({r['rps'] / base['rps']:.2f}x)   "
            f"p50 {r['p50_us']:6.0f} us   p99 {r['p99_us']:6.0f} us   "
            f"server CPU {r['cpu_per_call_us']:5.0f} us/call "
            f"({r['cpu_per_call_us'] / base['cpu_per_call_us']:.2f}x; supervisor "
            f"{r['supervisor_us']:.1f})   {r['calls_per_core_second']:6.0f} calls per core-second"
            f"   {r['cores']:.2f} cores busy   context switches/call {r['voluntary']:.1f} + "
            f"{r['involuntary']:.1f} involuntary   rows/inference {r['rows_per_inference']:.1f}"
            + (f"   client CPU {r['client_us']:.0f} us/call" if "client_us" in r else "")
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_workers")
    parser.add_argument("--seconds", type=float, default=8.0, help="per server")
    parser.add_argument("--calls", type=int, default=30_000, help="per server and h2load round")
    parser.add_argument("--rounds", type=int, default=3, help="h2load rounds (medians)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. main's worktree): its WORKERS=2 server measured too",
    )
    args = parser.parse_args(argv)
    at64 = f"@{2 * IN_FLIGHT}"
    with tempfile.TemporaryDirectory(prefix="xylen-bench-workers-") as tmp:
        root = Path(tmp)
        _, rows = build_model(root / "models")
        request = pb.PredictRequest(
            inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[0].tolist()))]
        )
        pinned = Server(root / "models", 2, root / "data-2", extra={"WORKER_CPU_AFFINITY": "auto"})
        unpinned = Server(root / "models", 2, root / "data-3", extra={"WORKER_CPU_AFFINITY": "off"})
        servers = {
            "1 worker": Server(root / "models", 1, root / "data-1"),
            "2 workers": pinned,
            # The same per-worker load as one worker at IN_FLIGHT: what each worker costs per
            # call when its share of the clients keeps it as busy (a host with spare cores).
            f"2 workers {at64}": pinned,
            "2 workers unpinned": unpinned,
            f"2 workers unpinned {at64}": unpinned,
        }
        if args.baseline is not None:
            other = Server(root / "models", 2, root / "data-4", source=args.baseline.resolve())
            servers[f"2 workers {args.baseline.name}"] = other
            servers[f"2 workers {args.baseline.name} {at64}"] = other
        levels = {name: 2 * IN_FLIGHT if at64 in name else IN_FLIGHT for name in servers}
        try:
            print(
                f"\n== WORKERS=1 vs WORKERS=2 (pinned: WORKER_CPU_AFFINITY=auto; unpinned: off, the default), "
                f"unary Predict, batch 1, {IN_FLIGHT} in flight over {CONNECTIONS} connections "
                f"each, {os.cpu_count()} cores, Python client on the same cores, in turn =="
            )
            result = asyncio.run(measure(servers, request, args.seconds, in_flight=levels))
            report(result)
            two = result[f"2 workers {at64}"]
            print(
                f"  scaling: at {IN_FLIGHT} calls in flight per worker, each worker serves "
                f"~{two['calls_per_core_second']:.0f} calls per core-second, so N workers on N "
                f"free cores predict ~N x {two['calls_per_core_second']:.0f} calls/s when the "
                "clients and the network keep up (here the client shares the 2 cores)"
            )
            if shutil.which("h2load") is None:
                print(
                    "\n== h2load variant skipped: no h2load on the PATH (Debian/Ubuntu: "
                    "apt-get install nghttp2-client) =="
                )
                return
            print(
                f"\n== the same servers driven by h2load (a C client), {args.calls} calls per "
                f"server and round, medians of {args.rounds} rounds, {CONNECTIONS} connections "
                "each =="
            )
            report(h2load(servers, request, args.calls, args.rounds, levels))
        finally:
            for server in {id(s): s for s in servers.values()}.values():
                server.stop()


if __name__ == "__main__":
    main()
