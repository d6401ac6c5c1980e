"""Continuous-learning benchmark, against real server processes on loopback:

* Feedback over gRPC: acknowledged (committed, fsynced) records/s at concurrency 32, group commit
  on / off, in turn (the store against the one it replaced: ``python -m bench feedback``);
* retrain time: the training job (the same subprocess the server runs, niced, 1 thread) on 10k
  and 100k feedback samples, incremental and full, and one whole Retrain RPC on 10k samples
  through the server (snapshot, train, gate, load, swap);
* Predict p50/p99 at batch 1: idle, while a retrain job runs, and while hot swaps run back to back.
  The target is p99 during retraining within 2x of idle.

``python -m bench.bench_learning [--seconds S]`` runs it alone; ``bench.__main__`` calls
:func:`main`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import polars as pl

from bench.bench_server import Process, build_model, start_xylen
from bench.bench_swaps import ADMIN_TOKEN, ProcessDriver  # its driver sends this token
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2
from xylen_server.auth import ADMIN_TOKEN_IDENTITY, bearer_metadata, with_token
from xylen_server.learning.job import JobSpec
from xylen_server.learning.samples import FeedbackRecord, records_table


def _labels(rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """Learnable labels (feature 0 above its median) with 20% flipped."""
    rng = np.random.default_rng(seed)
    y = (rows[:, 0] > np.median(rows[:, 0])).astype(np.int64)
    return np.where(rng.random(len(y)) < 0.2, 1 - y, y)


def _request(pid: str, row: np.ndarray, label: int, close: datetime) -> pb.FeedbackRequest:
    request = pb.FeedbackRequest(
        prediction_id=pid,
        outcome=pb.TradeOutcome(
            pnl=1.0 if label else -1.0,
            realized_return=0.01 if label else -0.01,
            underlying_log_return=0.01 if label else -0.01,
        ),
        features=types_pb2.FeatureVector(values=row.tolist()),
    )
    request.outcome.close_time.FromDatetime(close)
    return request


async def _feed(
    address: str,
    rows: np.ndarray,
    count: int | None,
    seconds: float,
    prefix: str,
    token: str = "",
) -> int:
    """Send Feedback from 32 concurrent tasks (``count`` records, or for ``seconds``), with the
    admin ``token`` if given (the gate scores only on authenticated outcomes)."""
    metadata = bearer_metadata(token)
    labels = _labels(rows)
    start = datetime.now(UTC) - timedelta(seconds=(count or 10**6) + 1)
    sent = 0
    stop = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)

        async def worker(k: int) -> None:
            nonlocal sent
            i = k
            while (count is None and time.perf_counter() < stop) or (
                count is not None and i < count
            ):
                j = i % len(rows)
                await stub.Feedback(
                    _request(
                        f"{prefix}-{i}", rows[j], int(labels[j]), start + timedelta(seconds=i)
                    ),
                    metadata=metadata,
                )
                sent += 1
                i += 32

        await asyncio.gather(*(worker(k) for k in range(32)))
    return sent


def feedback_throughput(root: Path, rows: np.ndarray, seconds: float) -> None:
    """Acknowledged Feedback records/s through a server, group commit on and off in turn.

    The store against the hand-made WAL store it replaced is ``python -m bench feedback``'s
    comparison, in one process with the same code around both. Here the old store would need
    the old server's code, which reads no model directory written today."""
    print("Feedback over gRPC, 32 concurrent callers, acknowledged = committed and fsynced:")
    rates: dict[str, list[float]] = {}
    rounds = 3
    for round_ in range(rounds):  # group commit on and off take turns: noise hits both alike
        for group in (True, False):
            label = f"SQLite store, group commit {'on ' if group else 'off'}"
            data = root / f"data-{round_}-{group}"
            server = start_xylen(
                root / "models",
                {
                    "FEEDBACK_DATA_DIR": str(data),
                    "RETRAIN_AUTO": "false",
                    "FEEDBACK_GROUP_COMMIT": str(group).lower(),
                },
            )
            try:
                address = f"127.0.0.1:{server.port}"
                asyncio.run(_feed(address, rows, 200, 10, "warm"))
                started = time.perf_counter()
                sent = asyncio.run(_feed(address, rows, None, seconds / rounds, "g"))
                rates.setdefault(label, []).append(sent / (time.perf_counter() - started))
            finally:
                server.stop()
    for label, values in rates.items():
        print(
            f"  {label}: {np.median(values):9,.0f} records/s acknowledged "
            f"(median of {rounds}: {', '.join(f'{v:,.0f}' for v in values)})"
        )


def _samples_parquet(path: Path, rows: np.ndarray, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    picked = rows[rng.integers(0, len(rows), n)]
    noisy = (picked * (1 + rng.normal(0, 0.01, picked.shape))).astype(np.float32)
    labels = _labels(noisy, seed)
    now = int(time.time() * 1000)
    records = [
        FeedbackRecord(
            f"s{i}",
            "model_1",
            1,
            noisy[i],
            None,
            None,
            1.0,
            0.01 if labels[i] else -0.01,
            now - (n - i) * 1000,
            now - (n - i) * 1000,
            int(labels[i]),
            source=ADMIN_TOKEN_IDENTITY,  # authenticated: the gate scores on them
        )
        for i in range(n)
    ]
    pl.from_arrow(records_table(records)).write_parquet(path)  # type: ignore[union-attr]


def retrain_times(root: Path, rows: np.ndarray) -> None:
    print("Retrain job (subprocess, nice 10, 1 thread; load samples, train, gate, write + ONNX):")
    kept = root / "models" / "model_1"
    for n in (10_000, 100_000):
        samples = root / f"samples-{n}.parquet"
        _samples_parquet(samples, rows, n, seed=n)
        for mode in ("incremental", "full"):
            job = root / f"job-{n}-{mode}"
            job.mkdir()
            spec = JobSpec(
                job_id=job.name,
                samples=str(samples),
                serving_dir=str(kept),
                candidate_dir=str(job / "candidate"),
                result=str(job / "result.json"),
                mode=mode,
                version=2,
                threads=1,
                nice=10,
            )
            spec.write(job / "spec.json")
            started = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "xylen_server.learning.job",
                    str(job / "spec.json"),
                ],
                check=True,
                capture_output=True,
            )
            elapsed = time.perf_counter() - started
            result = json.loads((job / "result.json").read_text())
            verdict = result.get("gate", {}).get("reason", result.get("message", ""))[:60]
            print(f"  {n:>7,} samples {mode:<11}: {elapsed:6.1f} s  ({verdict}...)")


TIMELINE: list[tuple[float, float]] = []
"""(start, seconds) of every call of the last :func:`_latency`, for a breakdown over time."""


def _latency(
    call: Callable[[], object], until: Callable[[], bool], max_seconds: float
) -> tuple[float, float, int]:
    samples = []
    stop = time.perf_counter() + max_seconds
    TIMELINE.clear()
    while time.perf_counter() < stop and not until():
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
        TIMELINE.append((started, samples[-1]))
    samples.sort()
    if not samples:
        return float("nan"), float("nan"), 0
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6, len(samples)


def predict_under_learning(root: Path, rows: np.ndarray, seconds: float) -> None:
    print("Predict at batch 1 (unary, one caller), p50 / p99:")
    server: Process = start_xylen(
        root / "models",
        {
            "FEEDBACK_DATA_DIR": str(root / "data-predict"),
            "RETRAIN_AUTO": "false",
            "ADMIN_TOKEN": ADMIN_TOKEN,
        },
    )
    try:
        address = f"127.0.0.1:{server.port}"
        asyncio.run(_feed(address, rows, 10_000, 600, "p", ADMIN_TOKEN))
        with grpc.insecure_channel(address) as plain:
            stub = pb_grpc.ModelServiceStub(with_token(plain, ADMIN_TOKEN))
            request = pb.PredictRequest(
                inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[7].tolist()))]
            )
            for _ in range(300):
                stub.Predict(request)
            p50, p99, n = _latency(lambda: stub.Predict(request), lambda: False, seconds)
            print(f"  idle              : p50 {p50:7.0f} us  p99 {p99:7.0f} us  ({n} calls)")
            idle_p99 = p99

            def info() -> pb.TrainingStatus:
                return stub.GetModelInfo(pb.GetModelInfoRequest()).model_info.training_status

            started = time.perf_counter()
            job = stub.Retrain(pb.RetrainRequest(mode=pb.RETRAIN_MODE_FULL)).job_id
            state = {"training": True}

            def watch() -> None:
                for update in stub.WatchRetrain(pb.WatchRetrainRequest(job_id=job)):
                    if update.status.stage in ("swapping", "done"):
                        state["training"] = False
                    if update.status.state not in (pb.TRAINING_STATE_RUNNING,):
                        break

            watcher = threading.Thread(target=watch)
            watcher.start()
            p50, p99, n = _latency(
                lambda: stub.Predict(request), lambda: not state["training"], 600
            )
            watcher.join()
            while info().state == pb.TRAINING_STATE_RUNNING:
                time.sleep(0.05)
            total = time.perf_counter() - started
            final = info()
            print(
                f"  during retraining : p50 {p50:7.0f} us  p99 {p99:7.0f} us  ({n} calls; "
                f"p99 {p99 / idle_p99:.2f}x idle; target <= 2x)"
            )
            print(
                f"  (that Retrain RPC, full on 10,000 samples end to end: {total:.1f} s, "
                f"{pb.TrainingState.Name(final.state)})"
            )
            # Swaps from a process of their own, as python -m bench swaps drives them: a thread
            # of this client blocked in RollbackModel puts its GIL in the measured calls' path
            versions = sorted(
                v.version for v in stub.ListModelVersions(pb.ListModelVersionsRequest()).versions
            )
            serving = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info.version
            if versions[-2:] != [1, 2]:
                print(f"  during hot swaps  : not measured (versions {versions}, not 1 and 2)")
                return
            driver = ProcessDriver(address, [3 - serving], 0.0)
            driver.start()
            try:
                p50, p99, n = _latency(lambda: stub.Predict(request), lambda: False, seconds * 2)
            finally:
                swaps = driver.stop()
            print(
                f"  during hot swaps  : p50 {p50:7.0f} us  p99 {p99:7.0f} us  ({n} calls; "
                f"{len(swaps)} swaps back to back from another process; "
                f"p99 {p99 / idle_p99:.2f}x idle)"
            )
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_learning")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xylen-bench-learning-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        _, rows = build_model(root / "models")
        print(
            f"model: 500 trees x 31 leaves, {rows.shape[1]} features, built in "
            f"{time.perf_counter() - started:.1f}s; cores: {os.cpu_count()}"
        )
        feedback_throughput(root, rows, args.seconds)
        retrain_times(root, rows)
        predict_under_learning(root, rows, args.seconds)
        print("  (shared, noisy machine: compare the ratios, measured in turn, not the absolutes)")


if __name__ == "__main__":
    main()
