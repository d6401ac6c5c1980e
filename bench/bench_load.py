"""Load: unary Predict at rising concurrency (32, 128, 512 calls in flight) against one server
process with the default admission limits (MAX_CONCURRENT_RPCS / MAX_QUEUED_RPCS) and, in
turn, against the same server with them lifted: p50/p99 of the calls served, calls served and
shed per second, and the server's RSS idle, under load and after. Then a burst of calls with
100 ms deadlines the server cannot meet, and the latency of the next call (work whose caller
left should not be worked off first).

``python -m bench load [--seconds S]``; the model is bench_server's (500 trees).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from bench.bench_server import Process, build_model, start_xylen
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2

LEVELS = (32, 128, 512)
CLIENTS = 4
UNLIMITED = {"MAX_CONCURRENT_RPCS": "1000000", "MAX_QUEUED_RPCS": "1000000"}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _drive(
    address: str, request: pb.PredictRequest, in_flight: int, seconds: float, pid: int
) -> tuple[list[float], Counter[str], float]:
    """``in_flight`` callers back to back for ``seconds``: latencies (s) of the calls served,
    status counts, and the peak RSS sampled meanwhile."""
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    peak = 0.0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        stop = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                try:
                    await stub.Predict(request, timeout=5)
                    latencies.append(time.perf_counter() - started)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(0.005)  # a shed caller backs off a little

        async def sample() -> None:
            nonlocal peak
            while time.perf_counter() < stop:
                peak = max(peak, rss_mib(pid))
                await asyncio.sleep(0.1)

        await asyncio.gather(sample(), *(caller() for _ in range(in_flight)))
    return latencies, codes, peak


async def _expired_burst(address: str, request: pb.PredictRequest, calls: int) -> tuple[int, float]:
    """``calls`` at once with 100 ms deadlines, then one more call: (expired, its latency ms)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)

        async def one() -> str:
            try:
                await stub.Predict(request, timeout=0.1)
                return "OK"
            except grpc.aio.AioRpcError as error:
                return error.code().name

        codes = Counter(await asyncio.gather(*(one() for _ in range(calls))))
        started = time.perf_counter()
        await stub.Predict(request, timeout=30)
        return codes["DEADLINE_EXCEEDED"], (time.perf_counter() - started) * 1000


def _client(args: tuple[str, bytes, int, float, int]) -> tuple[list[float], Counter[str], float]:
    address, body, in_flight, seconds, pid = args
    request = pb.PredictRequest.FromString(body)
    return asyncio.run(_drive(address, request, in_flight, seconds, pid))


def _level(
    name: str, server: Process, request: pb.PredictRequest, in_flight: int, seconds: float
) -> None:
    """``in_flight`` callers spread over :data:`CLIENTS` processes (one asyncio client cannot
    keep hundreds of calls in flight on a shared 2-core machine)."""
    address = f"127.0.0.1:{server.port}"
    share = [(address, request.SerializeToString(), in_flight // CLIENTS, seconds, server.proc.pid)]
    with multiprocessing.get_context("spawn").Pool(CLIENTS) as pool:
        parts = pool.map(_client, share * CLIENTS)
    latencies = [x for part in parts for x in part[0]]
    codes: Counter[str] = sum((part[1] for part in parts), Counter())
    peak = max(part[2] for part in parts)
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    other = {code: n for code, n in codes.items() if code not in ("OK", "RESOURCE_EXHAUSTED")}
    print(
        f"  {in_flight:4d} in flight, {name:20s}: p50 {np.percentile(ms, 50):7.2f} ms "
        f"p99 {np.percentile(ms, 99):7.2f} ms; served {codes['OK'] / seconds:6.0f}/s, "
        f"shed {codes['RESOURCE_EXHAUSTED'] / seconds:6.0f}/s, other {other or 'none'}; "
        f"RSS peak {peak:.0f} MiB",
        flush=True,
    )


def run(root: Path, rows: np.ndarray, seconds: float) -> None:
    request = pb.PredictRequest(
        inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[0].tolist()))]
    )
    heavy = pb.PredictRequest(
        inputs=[
            pb.PredictInput(features=types_pb2.FeatureVector(values=row.tolist()))
            for row in rows[:256]
        ]
    )
    servers: dict[str, Process] = {
        "limits on (defaults)": start_xylen(root, {"FEEDBACK_DATA_DIR": str(root / "on")}),
        "limits off": start_xylen(root, {**UNLIMITED, "FEEDBACK_DATA_DIR": str(root / "off")}),
    }
    try:
        idle = {name: rss_mib(s.proc.pid) for name, s in servers.items()}
        print("unary Predict, callers back to back (RESOURCE_EXHAUSTED: back off 5 ms)")
        batch = pb.PredictRequest(inputs=heavy.inputs[:32])
        for rows_label, body in (("1 row (on the loop)", request), ("32 rows (pool)", batch)):
            print(f" {rows_label}")
            for in_flight in LEVELS:
                for name, server in servers.items():  # in turn, so noise hits both alike
                    _level(name, server, body, in_flight, seconds)
        for name, server in servers.items():
            address = f"127.0.0.1:{server.port}"
            expired, next_ms = asyncio.run(_expired_burst(address, heavy, 2000))
            print(
                f"  2000 calls of 256 rows with 100 ms deadlines, {name}: {expired} expired; "
                f"the next call answered in {next_ms:.1f} ms"
            )
        time.sleep(2)
        for name, server in servers.items():
            print(
                f"  RSS {name}: idle {idle[name]:.0f} MiB, after the load "
                f"{rss_mib(server.proc.pid):.0f} MiB"
            )
    finally:
        for server in servers.values():
            server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_load")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xylen-bench-load-") as tmp:
        _, rows = build_model(Path(tmp))
        run(Path(tmp), rows, args.seconds)
        print("  (shared, noisy machine: compare the two servers, measured in turn)")


if __name__ == "__main__":
    main()
