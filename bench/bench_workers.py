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

``python -m bench workers [--seconds S]`` (default 8 s per server; about a minute in all).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


class Server:
    """A xylen server (one process or a supervisor and its workers) and its processes."""

    def __init__(self, model_root: Path, workers: int, data: Path, source: Path = REPO) -> None:
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
        )
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
        cpu = dict.fromkeys(servers, 0.0)
        latencies: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(max(1, int(seconds / slice_seconds))):
            for name, server in servers.items():
                before, started = cpu_seconds(server.pids), time.perf_counter()
                calls[name] += await _slice(
                    stubs[name], request, slice_seconds, latencies[name], level[name]
                )
                elapsed[name] += time.perf_counter() - started
                cpu[name] += cpu_seconds(server.pids) - before
    finally:
        for chans in channels.values():
            for channel in chans:
                await channel.close()
    out = {}
    for name in servers:
        values = np.sort(np.asarray(latencies[name]))
        out[name] = {
            "rps": calls[name] / elapsed[name],
            "p50_us": float(values[len(values) // 2] * 1e6),
            "p99_us": float(values[int(len(values) * 0.99)] * 1e6),
            "cpu_per_call_us": cpu[name] / calls[name] * 1e6,
            "calls_per_core_second": calls[name] / cpu[name],
            "cores": cpu[name] / elapsed[name],
        }
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_workers")
    parser.add_argument("--seconds", type=float, default=8.0, help="per server")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xylen-bench-workers-") as tmp:
        root = Path(tmp)
        _, rows = build_model(root / "models")
        request = pb.PredictRequest(
            inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[0].tolist()))]
        )
        pair = Server(root / "models", 2, root / "data-2")
        servers = {
            "1 worker": Server(root / "models", 1, root / "data-1"),
            "2 workers": pair,
            # The same per-worker load as one worker at IN_FLIGHT: what each worker costs per
            # call when its share of the clients keeps it as busy (a host with spare cores).
            f"2 workers @{2 * IN_FLIGHT}": pair,
        }
        try:
            print(
                f"\n== WORKERS=1 vs WORKERS=2, unary Predict, batch 1, {IN_FLIGHT} in flight over "
                f"{CONNECTIONS} connections each, {os.cpu_count()} cores (client on the same "
                "cores), measured in turn =="
            )
            result = asyncio.run(
                measure(
                    servers,
                    request,
                    args.seconds,
                    in_flight={f"2 workers @{2 * IN_FLIGHT}": 2 * IN_FLIGHT},
                )
            )
        finally:
            for server in {id(s): s for s in servers.values()}.values():
                server.stop()
    base = result["1 worker"]
    for name, r in result.items():
        print(
            f"  {name:<14} {r['rps']:6.0f} calls/s ({r['rps'] / base['rps']:.2f}x)   "
            f"p50 {r['p50_us']:6.0f} us   p99 {r['p99_us']:6.0f} us   "
            f"server CPU {r['cpu_per_call_us']:5.0f} us/call "
            f"({r['cpu_per_call_us'] / base['cpu_per_call_us']:.2f}x)   "
            f"{r['calls_per_core_second']:6.0f} calls per core-second   "
            f"{r['cores']:.2f} cores busy"
        )
    two = result[f"2 workers @{2 * IN_FLIGHT}"]
    print(
        f"  scaling: at {IN_FLIGHT} calls in flight per worker, each worker serves "
        f"~{two['calls_per_core_second']:.0f} calls per core-second,"
        f" so N workers on N free cores predict ~N x {two['calls_per_core_second']:.0f} calls/s"
        " when the clients and the network keep up (here the client shares the 2 cores)"
    )


if __name__ == "__main__":
    main()
