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

Those closed-loop levels compare each server at its own throughput: one worker at 32 in
flight is saturated, two sharing the same clients are each half busy, and a process's CPU per
call falls as it gets busier (more calls share each wake-up and each loop batch). The
``offered`` part therefore drives every server at one fixed rate (``h2load --rps``, ``--rate``
calls/s over :data:`OFFERED_CONNECTIONS` connections): one worker, one worker at half the rate (each
of two workers' share), two workers unpinned and pinned, and the floor of the same split, the
bare grpc.aio echo in one process and in two on one port (``SO_REUSEPORT``), unpinned
and pinned (``taskset``, a CPU each). Each row splits
the server's CPU per call by thread (:func:`thread_usage`: the event loop, grpc's poller and
the other Python threads, the threads grpc core and onnxruntime name) with the context
switches per call.

``python -m bench workers`` (defaults) or ``python -m bench.bench_workers [--seconds S]
[--calls N] [--rounds R] [--baseline TREE] [--parts python,h2load,offered] [--rate N]
[--offered-seconds S] [--offered-rounds R]``: 8 s per server with the Python client, 3 rounds
of 30,000 calls per server with h2load, 2 rounds of 6 s per server at 2000 calls/s; about
five minutes in all on this 2-core machine (the offered part alone, ``--parts offered``, two
and a half), one more with ``--baseline``, which adds the WORKERS=2 server of another checkout (run from
its tree with this interpreter) to the first two parts, e.g. main for a before/after.
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
OFFERED_CONNECTIONS = 16
"""Connections of the equal-offered-load part: the kernel hands each to one process (a hash of
its addresses), and 16 split between two far more evenly than 8 (7/8 of them or more to one
process: 7% of runs with 8, 0.4% with 16), so its two-process rows are two half-loaded
processes, as they mean to be."""
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
    server: Server | EchoServers,
    calls: float,
    elapsed: float,
    used: np.ndarray,
    counters: np.ndarray,
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


def run_h2load(command: Sequence[str], calls: int) -> subprocess.CompletedProcess[str]:
    """``command`` (h2load and its options, without ``-n``) for ``calls`` calls; raises on
    failure. Its output is the text h2load prints."""
    return subprocess.run(
        [command[0], "-n", str(calls), *command[1:]],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )


def check_answered(
    name: str, done: subprocess.CompletedProcess[str], calls: int, ok_by_server: int
) -> None:
    """Every one of ``calls`` answered: h2load counts HTTP status 200, so the server's own
    count of OK calls (``ok_by_server``) has to say as many."""
    succeeded = re.search(r"(\d+) succeeded", done.stdout)
    answered = int(succeeded.group(1)) if succeeded else 0
    if answered != calls or ok_by_server != calls:
        raise RuntimeError(
            f"h2load on {name}: {answered} of {calls} answered, {ok_by_server} OK by the "
            f"server's count: {done.stdout[-500:]}"
        )


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
                run_h2load(command, max(calls // 10, 1000))  # warm-up
                counted = predict_counters(server)
                before, started, client = usage(server.pids), time.perf_counter(), os.times()
                done = run_h2load(command, calls)
                elapsed = time.perf_counter() - started
                after, client_after = usage(server.pids), os.times()
                counters = predict_counters(server) - counted
                check_answered(name, done, calls, int(counters[2]))
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


THREAD_KINDS = ("loop", "python", "core")
"""How :func:`thread_usage` splits a process's threads: ``loop`` the main thread (the asyncio
event loop, where handlers, batching and loop inferences run), ``python`` its other Python
threads (grpc.aio's poller thread, which waits on grpc's completion queue and hands each event
to the loop over a socket pair, does grpc's I/O; also the session pool and the log flusher,
idle here) and ``core`` the threads grpc core and onnxruntime start and name themselves
(``event_engine``, ``grpc_global_tim``...)."""


def thread_usage(pids: Sequence[int]) -> np.ndarray:
    """Per pid and :data:`THREAD_KINDS`: CPU seconds (the scheduler's own count, in ns) and
    voluntary and involuntary context switches, shape (pids, kinds, 3). Python threads are
    told from grpc's and onnxruntime's by their name: they keep the process's, the others name
    themselves."""
    out = np.zeros((len(pids), len(THREAD_KINDS), 3))
    for row, pid in enumerate(pids):
        with contextlib.suppress(OSError):
            process_name = Path(f"/proc/{pid}/comm").read_text().strip()
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):  # a thread that ended
                name = (task / "comm").read_text().strip()
                nanos = int((task / "schedstat").read_text().split()[0])
                status = (task / "status").read_text()
                kind = 0 if int(task.name) == pid else 1 if name == process_name else 2
                out[row, kind] += (
                    nanos / 1e9,
                    int(status.split("\nvoluntary_ctxt_switches:", 1)[1].split()[0]),
                    int(status.split("nonvoluntary_ctxt_switches:", 1)[1].split()[0]),
                )
    return out


class EchoServers:
    """The floor: ``count`` bare grpc.aio echo processes on one port (``SO_REUSEPORT``, as
    ``WORKERS=count`` serves one port), each ``python -m bench.echo_server``."""

    workers = 1  # no supervisor among the pids
    metrics_port = 0  # no /metrics: answers are counted by h2load and checked once here

    def __init__(self, count: int, pinned: bool = False) -> None:
        self.processes: list[Process] = []
        port = 0
        cpus = sorted(os.sched_getaffinity(0))
        try:
            for index in range(count):
                command = [sys.executable, "-m", "bench.echo_server", "--reuse-port"]
                if pinned:  # as WORKER_CPU_AFFINITY=auto pins worker i: every thread on a CPU
                    command = ["taskset", "-c", str(cpus[index % len(cpus)]), *command]
                self.processes.append(
                    Process([*command, "--port", str(port)], dict(os.environ), "echo listening")
                )
                port = self.processes[0].port
        except BaseException:
            self.stop()
            raise
        self.address = f"127.0.0.1:{port}"
        self.pids = [p.proc.pid for p in self.processes]

    def check(self, frame: bytes) -> None:
        """One call over gRPC answers the request's bytes with status OK (h2load counts HTTP
        200, which a gRPC error also is)."""
        data = frame[5:]
        with grpc.insecure_channel(self.address) as channel:
            answer = channel.unary_unary(ECHO_METHOD)(data, timeout=10)
        if answer != data:
            raise RuntimeError(f"echo at {self.address} answered {len(answer)} bytes")

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


ECHO_METHOD = "/bench.Echo/Echo"


def offered_load(
    servers: dict[str, Server | EchoServers],
    request: pb.PredictRequest,
    rates: dict[str, int],
    seconds: float,
    rounds: int,
) -> dict[str, dict[str, float]]:
    """Each server in turn (``rounds`` times) at a fixed offered load: ``h2load --rps`` sends
    ``rates[name]`` calls a second over :data:`OFFERED_CONNECTIONS` connections for ``seconds``
    (every server the same calls/s, so CPU per call compares at equal load, where batching and
    wake-ups per call depend on it, instead of each at its own throughput). Sums over the
    rounds; every answer must be OK (the xylen servers' own count, the echo's checked once)."""
    frame = grpc_frame(request)
    with tempfile.TemporaryDirectory(prefix="xylen-bench-offered-") as tmp:
        body = Path(tmp) / "request.bin"
        body.write_bytes(frame)
        calls = dict.fromkeys(servers, 0)
        elapsed = dict.fromkeys(servers, 0.0)
        used = {name: np.zeros((len(s.pids), len(THREAD_KINDS), 3)) for name, s in servers.items()}
        counters = {name: np.zeros(3) for name in servers}
        for server in servers.values():
            if isinstance(server, EchoServers):
                server.check(frame)
        for _ in range(rounds):
            for name, server in servers.items():
                rate = rates[name]
                count = max(int(rate * seconds), OFFERED_CONNECTIONS)
                echo = isinstance(server, EchoServers)
                path = ECHO_METHOD if echo else "/xylen.v1.ModelService/Predict"
                command = [
                    "h2load",
                    *("-c", str(OFFERED_CONNECTIONS), "-m", "4"),
                    *("--rps", f"{rate / OFFERED_CONNECTIONS:g}"),
                    *("-H", "content-type: application/grpc", "-H", "te: trailers"),
                    *("-d", str(body)),
                    f"http://{server.address}{path}",
                ]
                run_h2load(command, max(count // 10, OFFERED_CONNECTIONS))  # warm-up
                counted = (
                    np.zeros(3) if isinstance(server, EchoServers) else predict_counters(server)
                )
                before, started = thread_usage(server.pids), time.perf_counter()
                done = run_h2load(command, count)
                elapsed[name] += time.perf_counter() - started
                used[name] += thread_usage(server.pids) - before
                got = (
                    np.array([0, 0, count])
                    if isinstance(server, EchoServers)
                    else predict_counters(server) - counted
                )
                check_answered(name, done, count, int(got[2]))
                counters[name] += got
                calls[name] += count
    out = {}
    for name, server in servers.items():
        per_kind = used[name]
        supervisor = per_kind[0, :, 0].sum() if server.workers > 1 else 0.0
        workers = per_kind[1:] if server.workers > 1 else per_kind
        process_cpu = workers[:, :, 0].sum(axis=1)
        out[name] = _figures(
            server, calls[name], elapsed[name], per_kind.sum(axis=1), counters[name]
        ) | {
            "supervisor_us": float(supervisor) / calls[name] * 1e6,
            "rate": float(rates[name]),
            "processes": float(len(process_cpu)),
            "busiest_share": float(process_cpu.max() / max(process_cpu.sum(), 1e-9)),
            **{
                f"{kind}_us": float(workers[:, k, 0].sum()) / calls[name] * 1e6
                for k, kind in enumerate(THREAD_KINDS)
            },
            **{
                f"{kind}_switches": float(workers[:, k, 1:].sum()) / calls[name]
                for k, kind in enumerate(THREAD_KINDS)
            },
        }
    return out


def report_offered(result: dict[str, dict[str, float]], bases: dict[str, str]) -> None:
    """One line per server: CPU per call against ``bases[name]``'s (its own kind with one
    process, at the same offered load), split by thread kind, and the wake-ups per call.
    (No latencies: ``h2load --rps`` starts each connection's calls in bursts, so they would
    measure its pacing.)"""
    for name, r in result.items():
        base = result[bases[name]]
        split = (
            f"   busiest process {r['busiest_share'] * 100:.0f}% of the CPU"
            if r["processes"] > 1
            else ""
        )
        print(
            f"  {name:<24} {r['rate']:5.0f} offered, {r['rps']:5.0f} calls/s   "
            f"server CPU {r['cpu_per_call_us']:4.0f} us/call "
            f"({r['cpu_per_call_us'] / base['cpu_per_call_us']:.2f}x {bases[name]}): "
            f"loop thread {r['loop_us']:.0f}, other Python threads (grpc's poller) "
            f"{r['python_us']:.0f}, grpc/onnxruntime threads {r['core_us']:.1f}, supervisor "
            f"{r['supervisor_us']:.1f}   context switches/call {r['voluntary']:.1f} + "
            f"{r['involuntary']:.1f} involuntary (loop thread {r['loop_switches']:.1f})   "
            f"rows/inference {r['rows_per_inference']:.1f}" + split
        )


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


PARTS = ("python", "h2load", "offered")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.bench_workers")
    parser.add_argument("--seconds", type=float, default=8.0, help="per server")
    parser.add_argument("--calls", type=int, default=30_000, help="per server and h2load round")
    parser.add_argument("--rounds", type=int, default=3, help="h2load rounds (medians)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. main's worktree): its WORKERS=2 server measured too",
    )
    parser.add_argument(
        "--parts",
        type=lambda text: tuple(part for part in text.split(",") if part),
        default=PARTS,
        help=f"which of {','.join(PARTS)} to run (default all): the Python client at "
        f"{IN_FLIGHT} and {2 * IN_FLIGHT} in flight, h2load at the same levels, h2load at an "
        "equal offered load for every server (and the echo floor in one and two processes)",
    )
    parser.add_argument(
        "--rate", type=int, default=2000, help="offered calls/s of the equal-load part"
    )
    parser.add_argument(
        "--offered-seconds", type=float, default=6.0, help="per server and round of that part"
    )
    parser.add_argument("--offered-rounds", type=int, default=2, help="rounds of that part")
    args = parser.parse_args(argv)
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown or not args.parts:
        parser.error(f"--parts: choose from {','.join(PARTS)} (got {','.join(unknown) or 'none'})")
    for name in ("seconds", "calls", "rounds", "rate", "offered_seconds", "offered_rounds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    at64 = f"@{2 * IN_FLIGHT}"
    with tempfile.TemporaryDirectory(prefix="xylen-bench-workers-") as tmp:
        root = Path(tmp)
        _, rows = build_model(root / "models")
        request = pb.PredictRequest(
            inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[0].tolist()))]
        )
        pinned = Server(root / "models", 2, root / "data-2", extra={"WORKER_CPU_AFFINITY": "auto"})
        unpinned = Server(root / "models", 2, root / "data-3", extra={"WORKER_CPU_AFFINITY": "off"})
        one = Server(root / "models", 1, root / "data-1")
        servers = {
            "1 worker": one,
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
        echoes: list[EchoServers] = []
        try:
            if "python" in args.parts:
                print(
                    f"\n== WORKERS=1 vs WORKERS=2 (pinned: WORKER_CPU_AFFINITY=auto; unpinned: "
                    f"off, the default), unary Predict, batch 1, {IN_FLIGHT} in flight over "
                    f"{CONNECTIONS} connections each, {os.cpu_count()} cores, Python client on "
                    "the same cores, in turn =="
                )
                result = asyncio.run(measure(servers, request, args.seconds, in_flight=levels))
                report(result)
                two = result[f"2 workers {at64}"]
                print(
                    f"  scaling: at {IN_FLIGHT} calls in flight per worker, each worker serves "
                    f"~{two['calls_per_core_second']:.0f} calls per core-second, so N workers on "
                    f"N free cores predict ~N x {two['calls_per_core_second']:.0f} calls/s when "
                    "the clients and the network keep up (here the client shares the 2 cores)"
                )
            if shutil.which("h2load") is None:
                print(
                    "\n== h2load parts skipped: no h2load on the PATH (Debian/Ubuntu: "
                    "apt-get install nghttp2-client) =="
                )
                return
            if "h2load" in args.parts:
                print(
                    f"\n== the same servers driven by h2load (a C client), {args.calls} calls "
                    f"per server and round, medians of {args.rounds} rounds, {CONNECTIONS} "
                    "connections each =="
                )
                report(h2load(servers, request, args.calls, args.rounds, levels))
            if "offered" in args.parts:
                echoes = [EchoServers(1), EchoServers(2), EchoServers(2, pinned=True)]
                rate, half = args.rate, args.rate // 2
                offered: dict[str, Server | EchoServers] = {
                    "1 worker": one,
                    "1 worker, half the load": one,
                    "2 workers unpinned": unpinned,
                    "2 workers pinned": pinned,
                    "echo, 1 process": echoes[0],
                    "echo, 1 process, half": echoes[0],
                    "echo, 2 processes": echoes[1],
                    "echo, 2 pinned": echoes[2],
                }
                rates = {name: half if "half" in name else rate for name in offered}
                bases = {
                    name: "echo, 1 process" if "echo" in name else "1 worker" for name in offered
                }
                print(
                    f"\n== equal offered load: h2load --rps, {rate} calls/s to every server "
                    f"({half} for the 'half' rows: what each of two workers gets), "
                    f"{OFFERED_CONNECTIONS} connections, {args.offered_rounds} rounds of "
                    f"{args.offered_seconds:g}s each, in turn; the bare grpc.aio echo in one and "
                    "in two processes on one port (SO_REUSEPORT) is the floor of the same split =="
                )
                result = offered_load(
                    offered, request, rates, args.offered_seconds, args.offered_rounds
                )
                report_offered(result, bases)
                cpu = {name: r["cpu_per_call_us"] for name, r in result.items()}
                print(
                    f"  at {rate} calls/s two workers cost "
                    f"{cpu['2 workers unpinned'] / cpu['1 worker']:.2f}x one worker's server CPU "
                    f"per call (pinned {cpu['2 workers pinned'] / cpu['1 worker']:.2f}x); two "
                    f"bare echo processes {cpu['echo, 2 processes'] / cpu['echo, 1 process']:.2f}x "
                    f"one echo's (pinned {cpu['echo, 2 pinned'] / cpu['echo, 1 process']:.2f}x). "
                    "One process at half the load: xylen "
                    f"{cpu['1 worker, half the load'] / cpu['1 worker']:.2f}x, echo "
                    f"{cpu['echo, 1 process, half'] / cpu['echo, 1 process']:.2f}x (fewer calls "
                    "share each wake-up and each loop batch)"
                )
        finally:
            for server in {id(s): s for s in servers.values()}.values():
                server.stop()
            for echo in echoes:
                echo.stop()


if __name__ == "__main__":
    main()
