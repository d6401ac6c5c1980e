"""Ensemble over four local model server processes vs one server's Predict, in the same run.

Prints p50/p99 latency at batch 1 and throughput at concurrency 8 and 32 for

* ``single``: grpc.aio unary ``ModelService.Predict`` to one server;
* ``ensemble-lib``: :class:`~xylen_coordinator.AsyncCoordinator` in-process (stream fan-out
  to four servers, weighted vote);
* ``ensemble-grpc``: ``EnsembleService.Predict`` on a ``xylen-coordinator serve`` process in
  front of the same four servers (one more hop).

Inputs are candle windows (what the coordinator sends every server) and, separately, feature
vectors. Everything shares this machine's cores with the client, as it would in production on
one host. Run: ``python -m bench.bench_coordinator`` (or via ``make bench``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402

from xylen.v1 import ensemble_service_pb2 as epb  # noqa: E402
from xylen.v1 import ensemble_service_pb2_grpc as epb_grpc  # noqa: E402
from xylen.v1 import model_service_pb2 as pb  # noqa: E402
from xylen.v1 import model_service_pb2_grpc as pb_grpc  # noqa: E402
from xylen_coordinator import AsyncCoordinator  # noqa: E402

MODELS = (("model_1", "lightgbm"), ("model_2", "xgboost"), ("model_3", "catboost"),
          ("model_4", "lightgbm"))  # fmt: skip
WEIGHTS = (0.4, 0.3, 0.2, 0.1)
SEQUENTIAL_CALLS = int(os.environ.get("BENCH_CALLS", "600"))
THROUGHPUT_SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))

Call = Callable[[], Awaitable[object]]


async def latency(call: Call, n: int) -> tuple[float, float]:
    for _ in range(50):
        await call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    p50, p99 = np.percentile(samples, [50, 99])
    return float(p50) * 1000, float(p99) * 1000


async def throughput(call: Call, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def measure(name: str, call: Call) -> dict[str, float]:
    p50, p99 = await latency(call, SEQUENTIAL_CALLS)
    t8 = await throughput(call, 8, THROUGHPUT_SECONDS)
    t32 = await throughput(call, 32, THROUGHPUT_SECONDS)
    row = {"p50_ms": p50, "p99_ms": p99, "rps_c8": t8, "rps_c32": t32}
    print(f"  {name:<16}{p50:>9.2f}{p99:>9.2f}{t8:>10.0f}{t32:>10.0f}", flush=True)
    return row


async def run(servers: list[harness.ServerProcess], workdir: Path) -> dict[str, dict[str, float]]:
    candles = harness.synthetic_candles(400)
    x, _ = harness.training_rows(candles)
    inputs = {
        "window": harness.window_input(candles, 350),
        "features": harness.feature_input(x[200]),
    }
    config = {
        "model_endpoints": [
            {"name": name, "host": "127.0.0.1", "port": s.port, "weight": w}
            for (name, _), s, w in zip(MODELS, servers, WEIGHTS, strict=True)
        ],
        "deadline_ms": 2000,
        "feedback_queue": {"path": str(workdir / "feedback.sqlite3")},
    }
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # The in-process library is a second coordinator: an outbox of its own (one per coordinator)
    library_config = workdir / "library.yaml"
    library_queue = {"feedback_queue": {"path": str(workdir / "library-feedback.sqlite3")}}
    library_config.write_text(yaml.safe_dump(config | library_queue))
    coordinator_proc = subprocess.Popen(
        [sys.executable, "-m", "xylen_coordinator", "--log-level", "WARNING", "serve",
         "--config", str(config_path), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert coordinator_proc.stdout is not None
    port = int(coordinator_proc.stdout.readline().rsplit(" ", 1)[1])
    results: dict[str, dict[str, float]] = {}
    try:
        async with (
            grpc.aio.insecure_channel(servers[0].address) as single_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ensemble_channel,
            AsyncCoordinator(library_config) as library,
        ):
            single = pb_grpc.ModelServiceStub(single_channel)
            remote = epb_grpc.EnsembleServiceStub(ensemble_channel)
            await library.wait_serving(timeout=30)
            await asyncio.sleep(1.0)  # the coordinator process sees its servers SERVING
            print(f"  {'':<16}{'p50 ms':>9}{'p99 ms':>9}{'rps c=8':>10}{'rps c=32':>10}")
            for kind, inp in inputs.items():
                print(f"input: {kind}, batch 1")
                request = pb.PredictRequest(inputs=[inp])
                ensemble_request = epb.EnsembleServicePredictRequest(inputs=[inp])
                results[f"single/{kind}"] = await measure(
                    "single",
                    lambda r=request: single.Predict(r),  # type: ignore[misc]
                )
                results[f"ensemble-lib/{kind}"] = await measure(
                    "ensemble-lib",
                    lambda i=inp: library.predict([i]),  # type: ignore[misc]
                )
                results[f"ensemble-grpc/{kind}"] = await measure(
                    "ensemble-grpc",
                    lambda r=ensemble_request: remote.Predict(r),  # type: ignore[misc]
                )
    finally:
        coordinator_proc.send_signal(signal.SIGTERM)
        coordinator_proc.wait(30)
    return results


def main() -> dict[str, dict[str, float]]:
    """Start four servers, measure, print, stop everything; returns the figures."""
    print(f"coordinator benchmark: 4 model servers on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="xylen-bench-") as tmp:
        workdir = Path(tmp)
        for i, (name, kind) in enumerate(MODELS, start=1):
            harness.write_model(workdir, name, kind, trees=60, seed=i)
        servers = [harness.start_server(workdir, name, wait=False) for name, _ in MODELS]
        try:
            for server in servers:
                server.wait_serving()
            results = asyncio.run(run(servers, workdir))
        finally:
            for server in servers:
                server.stop()
    for kind in ("window", "features"):
        single = results[f"single/{kind}"]["p50_ms"]
        for variant in ("ensemble-lib", "ensemble-grpc"):
            ratio = results[f"{variant}/{kind}"]["p50_ms"] / single
            verdict = "meets" if ratio <= 2.0 else "misses"
            print(f"{variant} p50 / single p50 ({kind}): {ratio:.2f}x ({verdict} the 2x target)")
    return results


if __name__ == "__main__":
    main()
