"""Predict latency while hot swaps run back to back, against the same load without swaps.

A server process serves a 500-tree LightGBM model with two kept versions; a client keeps
``--in-flight`` unary Predict calls (batch 1) going. Rounds alternate: load alone, then load
while a second thread calls RollbackModel between the two versions back to back (each a full
load: the parity reference child, one ONNX Runtime session built off the loop, warm-up, an
atomic swap). The ratio is p99 during swaps over p99 without, medians over the rounds, so
machine noise hits both alike. Target: within 2x.

    python -m bench swaps                        # ~1 minute
    python -m bench.bench_swaps --source /path   # the same against another checkout's server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench.bench_server import REPO, build_model, start_xylen
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2
from xylen_server.auth import with_token

ADMIN_TOKEN = "bench-admin-token"


async def _load(
    address: str, request: pb.PredictRequest, in_flight: int, seconds: float
) -> list[float]:
    """Latencies (s) of unary Predicts kept ``in_flight`` at once for ``seconds``."""
    samples: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        for _ in range(50):
            await stub.Predict(request)
        stop = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                await stub.Predict(request, timeout=30)
                samples.append(time.perf_counter() - started)

        await asyncio.gather(*(caller() for _ in range(in_flight)))
    return samples


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e6


def _second_version(model_dir: Path) -> None:
    """Turn the served directory into version 2 of the same model (its files unchanged)."""
    meta_path = model_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = 2
    meta_path.write_text(json.dumps(meta, indent=2))


def run(source: Path, seconds: float, rounds: int, in_flight: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="xylen-bench-swaps-") as tmp:
        root = Path(tmp)
        model_dir, rows = build_model(root / "models")
        server = start_xylen(
            root / "models",
            {
                "FEEDBACK_DATA_DIR": str(root / "data"),
                "RETRAIN_AUTO": "false",
                "ADMIN_TOKEN": ADMIN_TOKEN,
            },
            source=source,
        )
        try:
            address = f"127.0.0.1:{server.port}"
            request = pb.PredictRequest(
                inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[7].tolist()))]
            )
            with grpc.insecure_channel(address) as plain:
                admin = pb_grpc.ModelServiceStub(with_token(plain, ADMIN_TOKEN))
                _second_version(model_dir)
                admin.ReloadModel(pb.ReloadModelRequest(), timeout=300)
                idle: list[float] = []
                swapping: list[float] = []
                swaps = 0
                swap_seconds: list[float] = []
                state: dict[str, int | bool] = {"on": True, "count": 0, "target": 1}
                for _ in range(rounds):
                    samples = asyncio.run(_load(address, request, in_flight, seconds))
                    idle.append(_p(samples, 0.99))
                    state["on"], state["count"] = True, 0

                    def swapper() -> None:
                        while state["on"]:
                            target = int(state["target"])
                            started = time.perf_counter()
                            admin.RollbackModel(
                                pb.RollbackModelRequest(version=target), timeout=300
                            )
                            swap_seconds.append(time.perf_counter() - started)
                            state["count"] = int(state["count"]) + 1
                            state["target"] = 3 - target

                    thread = threading.Thread(target=swapper)
                    thread.start()
                    time.sleep(0.2)
                    samples = asyncio.run(_load(address, request, in_flight, seconds))
                    state["on"] = False
                    thread.join()
                    swapping.append(_p(samples, 0.99))
                    swaps += int(state["count"])
        finally:
            server.stop()
    idle_p99, swap_p99 = statistics.median(idle), statistics.median(swapping)
    print(
        f"  Predict batch 1, {in_flight} in flight, {rounds} rounds of {seconds:.0f}s each way; "
        f"{swaps} swaps back to back, {statistics.median(swap_seconds):.2f} s each (median)"
    )
    print(
        f"  p99 without swaps (median of rounds): {idle_p99:8.0f} us   rounds {[round(v) for v in idle]}"
    )
    print(
        f"  p99 during swaps  (median of rounds): {swap_p99:8.0f} us   rounds {[round(v) for v in swapping]}"
    )
    print(f"  swap p99 / idle p99: {swap_p99 / idle_p99:.2f}x  (target <= 2x)")
    return {"idle_p99_us": idle_p99, "swap_p99_us": swap_p99, "ratio": swap_p99 / idle_p99}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_swaps")
    parser.add_argument("--seconds", type=float, default=6.0, help="per round, each way")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--source", type=Path, default=REPO, help="checkout whose server runs")
    args = parser.parse_args(argv)
    print(f"== hot swaps under load (server from {args.source}) ==")
    run(args.source, args.seconds, args.rounds, args.in_flight)


if __name__ == "__main__":
    main()
