"""Feedback storage benchmark: acknowledged (fsynced) records/s with and without group commit,
the cost of compaction, and the cost of PredictionLog.record on the Predict path.

``python -m bench.bench_feedback [--seconds S] [--dir DIR]`` runs it alone; ``bench.__main__``
calls :func:`main`. DIR must be on the disk the server writes to (fsync cost is the disk's).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.prediction_log import PredictionLog
from xylen_server.learning.samples import FeedbackRecord

FEATURES = 24


def _record(worker: int, i: int) -> FeedbackRecord:
    features = np.full(FEATURES, worker + i / 7, dtype=np.float32)
    return FeedbackRecord(
        f"w{worker}-{i}", "model_1", 1, features, 0.6, 1, 3.5, 0.004, 1_700_000_000_000, 0
    )


def _threads(directory: Path, group_commit: bool, workers: int, seconds: float) -> str:
    latencies: list[list[float]] = [[] for _ in range(workers)]
    stop = time.perf_counter() + seconds
    with FeedbackStore(directory, group_commit=group_commit, compact_rows=0) as store:

        def work(worker: int) -> None:
            i = 0
            while time.perf_counter() < stop:
                started = time.perf_counter()
                store.append(_record(worker, i))
                latencies[worker].append(time.perf_counter() - started)
                i += 1

        started = time.perf_counter()
        threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        records, fsyncs = store.count(), store.commit_count
    ms = np.array([x for worker in latencies for x in worker]) * 1000
    return (
        f"{records / elapsed:9,.0f} records/s  {records / max(fsyncs, 1):6.1f} records/fsync  "
        f"append p50={np.percentile(ms, 50):6.2f} ms  p99={np.percentile(ms, 99):6.2f} ms"
    )


def _asyncio(directory: Path, group_commit: bool, tasks: int, seconds: float) -> str:
    async def run(store: FeedbackStore) -> float:
        stop = time.perf_counter() + seconds

        async def work(worker: int) -> None:
            i = 0
            while time.perf_counter() < stop:
                await store.append_async(_record(worker, i))
                i += 1

        started = time.perf_counter()
        await asyncio.gather(*(work(w) for w in range(tasks)))
        return time.perf_counter() - started

    with FeedbackStore(directory, group_commit=group_commit, compact_rows=0) as store:
        elapsed = asyncio.run(run(store))
        records, fsyncs = store.count(), store.commit_count
    return f"{records / elapsed:9,.0f} records/s  {records / max(fsyncs, 1):6.1f} records/fsync"


def _compaction(directory: Path, rows: int) -> str:
    with FeedbackStore(directory, compact_rows=0, compact_on_close=False) as store:
        workers = 32
        done = threading.Barrier(workers + 1)

        def work(worker: int) -> None:
            for i in range(rows // workers):
                store.append(_record(worker, i))
            done.wait()

        for w in range(workers):
            threading.Thread(target=work, args=(w,)).start()
        done.wait()
        started = time.perf_counter()
        store.compact()
        compact_s = time.perf_counter() - started
    started = time.perf_counter()
    with FeedbackStore(directory, compact_on_close=False) as store:
        open_s = time.perf_counter() - started
        started = time.perf_counter()
        frame = store.read_samples()
        read_s = time.perf_counter() - started
    return (
        f"{frame.height:,} records: compact {compact_s * 1000:.0f} ms "
        f"({frame.height / compact_s:,.0f} records/s), reopen {open_s * 1000:.0f} ms, "
        f"read_samples {read_s * 1000:.0f} ms"
    )


def _record_cost(directory: Path | None, rows: int, calls: int) -> str:
    log = PredictionLog(directory, max_rows=100_000, flush_rows=20_000)
    batches = []
    for c in range(calls):
        ids = [f"p-{c}-{r}" for r in range(rows)]
        batches.append(
            (ids, np.random.rand(rows, FEATURES).astype(np.float32), np.random.rand(rows))
        )
    signals = np.full(rows, 3, dtype=np.int32)
    started = time.perf_counter()
    for ids, features, probabilities in batches:
        log.record(ids, features, probabilities, signals, "model_1", 1)
    elapsed = time.perf_counter() - started
    log.close()
    per_call = elapsed / calls * 1e6
    return f"batch {rows:>3}: {per_call:6.2f} µs per call, {per_call / rows * 1000:7.0f} ns per row"


def main(argv: Sequence[str] | None = None) -> None:
    """Run every measurement and print labelled figures."""
    parser = argparse.ArgumentParser(prog="bench.bench_feedback")
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput measurement")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xylen-bench-feedback-", dir=args.dir) as tmp:
        root = Path(tmp)
        runs = iter(range(1_000_000))

        def fresh() -> Path:
            return root / f"run-{next(runs)}"

        print(f"== feedback: acknowledged (fsynced) appends, {args.seconds:.0f} s each, {root}")
        for group_commit in (False, True):
            label = "group commit" if group_commit else "no group commit"
            for workers in (1, 8, 32):
                figures = _threads(fresh(), group_commit, workers, args.seconds)
                print(f"  {label:<15} {workers:>2} threads  {figures}")
            figures = _asyncio(fresh(), group_commit, 32, args.seconds)
            print(f"  {label:<15} 32 asyncio  {figures}")
        print("== feedback: compaction WAL -> Parquet (Snappy)")
        print(f"  {_compaction(fresh(), 6_400)}")
        print("== prediction log: record() on the Predict path (24 float32 features)")
        for rows in (1, 64):
            print(f"  memory only     {_record_cost(None, rows, 20_000)}")
            print(f"  with Parquet    {_record_cost(fresh(), rows, 20_000)}")


if __name__ == "__main__":
    main()
