"""Feedback storage benchmark: acknowledged (committed, fsynced) records/s of the SQLite store
against the hand-made WAL store it replaced, measured in turn in one run, with threads and
asyncio, 1 and 32 writers; the cost of compaction; the cost of PredictionLog.record on the
Predict path.

The old store is the code of :data:`OLD_STORE_COMMIT`, read with ``git show`` into temporary
modules of this process (its figures are left out, saying why, where git or that commit is not
there). ``python -m bench.bench_feedback [--seconds S] [--dir DIR]`` runs it alone;
``bench.__main__`` calls :func:`main`. DIR must be on the disk the server writes to (fsync
cost is the disk's).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.prediction_log import PredictionLog
from xylen_server.learning.samples import FeedbackRecord

FEATURES = 24
REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3
"""Each figure is the median of this many runs, the stores taking turns."""
OLD_STORE_COMMIT = "5398b3bedd11619a2aeb119a9fba25f92c4588cb"
"""The last commit with the hand-made write-ahead-log feedback store."""


class Store:
    """One store implementation under test: how to open it and make its records."""

    def __init__(self, name: str, opener: Callable[..., Any], record: type) -> None:
        self.name, self.open, self.record_type = name, opener, record

    def record(self, worker: int, i: int) -> Any:
        features = np.full(FEATURES, worker + i / 7, dtype=np.float32)
        # The old store's records came before the stored label (a field the current ones need)
        label = {"label": 1} if "label" in {f.name for f in fields(self.record_type)} else {}
        return self.record_type(
            f"w{worker}-{i}",
            "model_1",
            1,
            features,
            0.6,
            1,
            3.5,
            0.004,
            1_700_000_000_000,
            0,
            **label,
        )


def _commits(store: Any) -> int:
    return int(getattr(store, "commit_count", getattr(store, "fsync_count", 0)))


def _git_source(path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{OLD_STORE_COMMIT}:{path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    exec(compile(source, f"<{OLD_STORE_COMMIT[:7]}:{name}>", "exec"), module.__dict__)
    return module


def old_store() -> Store | str:
    """The WAL store of :data:`OLD_STORE_COMMIT`, or why it cannot be loaded here."""
    try:
        samples = _module("bench_old_samples", _git_source("xylen_server/learning/samples.py"))
        source = _git_source("xylen_server/learning/feedback_store.py").replace(
            "from xylen_server.learning.samples import", "from bench_old_samples import"
        )
        store = _module("bench_old_feedback_store", source)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"the old store is not measured: git show {OLD_STORE_COMMIT[:7]} failed ({exc})"
    return Store("old WAL", store.FeedbackStore, samples.FeedbackRecord)


NEW = Store("SQLite", FeedbackStore, FeedbackRecord)


def _writers(work: Callable[[int], None], workers: int, what: str) -> None:
    """``work(0)`` .. ``work(workers - 1)`` on threads of their own, until all are done. One that
    fails fails the figure (``what``: whose writers), with its error as the cause: a figure of
    the other writers alone would not be the one printed."""
    failures: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            work(worker)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{what}: {len(failures)} of {workers} writers failed") from failures[0]


def _threads(
    kind: Store, directory: Path, group_commit: bool, workers: int, seconds: float
) -> tuple[float, str]:
    latencies: list[list[float]] = [[] for _ in range(workers)]
    stop = time.perf_counter() + seconds
    with kind.open(directory, group_commit=group_commit, compact_rows=0) as store:

        def work(worker: int) -> None:
            i = 0
            while time.perf_counter() < stop:
                started = time.perf_counter()
                store.append(kind.record(worker, i))
                latencies[worker].append(time.perf_counter() - started)
                i += 1

        started = time.perf_counter()
        _writers(work, workers, kind.name)
        elapsed = time.perf_counter() - started
    records, commits = store.count(), _commits(store)
    ms = np.array([x for worker in latencies for x in worker]) * 1000
    rate = records / elapsed
    return rate, (
        f"{rate:9,.0f} records/s  {records / max(commits, 1):6.1f} records/commit  "
        f"append p50={np.percentile(ms, 50):6.2f} ms  p99={np.percentile(ms, 99):6.2f} ms"
    )


def _asyncio(kind: Store, directory: Path, tasks: int, seconds: float) -> tuple[float, str]:
    async def run(store: Any) -> float:
        stop = time.perf_counter() + seconds

        async def work(worker: int) -> None:
            i = 0
            while time.perf_counter() < stop:
                await store.append_async(kind.record(worker, i))
                i += 1

        started = time.perf_counter()
        await asyncio.gather(*(work(w) for w in range(tasks)))
        return time.perf_counter() - started

    with kind.open(directory, compact_rows=0) as store:
        elapsed = asyncio.run(run(store))
        records, commits = store.count(), _commits(store)
    rate = records / elapsed
    return rate, f"{rate:9,.0f} records/s  {records / max(commits, 1):6.1f} records/commit"


def _compaction(directory: Path, rows: int) -> str:
    record = NEW.record
    with FeedbackStore(directory, compact_rows=0, compact_on_close=False) as store:
        workers = 32

        def work(worker: int) -> None:
            for i in range(rows // workers):
                store.append(record(worker, i))

        _writers(work, workers, "compaction")
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
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput figure")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xylen-bench-feedback-", dir=args.dir) as tmp:
        root = Path(tmp)
        runs = iter(range(1_000_000))

        def fresh() -> Path:
            return root / f"run-{next(runs)}"

        old = old_store()
        kinds = [NEW] if isinstance(old, str) else [old, NEW]
        seconds = args.seconds / ROUNDS
        print(
            f"== feedback: acknowledged (committed, fsynced) appends, group commit, "
            f"{ROUNDS} rounds of {seconds:.1f} s each, {root}"
        )
        if isinstance(old, str):
            print(f"  ({old})")
        runs_ = [
            ("threads", 1, lambda kind: _threads(kind, fresh(), True, 1, seconds)),
            ("threads", 32, lambda kind: _threads(kind, fresh(), True, 32, seconds)),
            ("asyncio", 1, lambda kind: _asyncio(kind, fresh(), 1, seconds)),
            ("asyncio", 32, lambda kind: _asyncio(kind, fresh(), 32, seconds)),
        ]
        for how, writers, measure in runs_:
            rates: dict[str, list[float]] = {kind.name: [] for kind in kinds}
            shown: dict[str, str] = {}
            for _ in range(ROUNDS):  # in turn, so machine noise hits both alike
                for kind in kinds:
                    rate, shown[kind.name] = measure(kind)
                    rates[kind.name].append(rate)
            for kind in kinds:
                median = float(np.median(rates[kind.name]))
                print(
                    f"  {kind.name:<8} {writers:>2} {how:<7}  median {median:9,.0f} records/s "
                    f"of {ROUNDS}; last: {shown[kind.name]}"
                )
            if len(kinds) == 2:
                ratio = np.median(rates["SQLite"]) / np.median(rates["old WAL"])
                print(f"  {'':<8} SQLite / old WAL: {ratio:.2f}x")
        _, figures = _threads(NEW, fresh(), False, 32, args.seconds)
        print(f"  SQLite   32 threads, one commit per append (no group commit): {figures}")
        print("== feedback: compaction SQLite -> Parquet (Snappy)")
        print(f"  {_compaction(fresh(), 6_400)}")
        print("== prediction log: record() on the Predict path (24 float32 features)")
        for rows in (1, 64):
            print(f"  memory only     {_record_cost(None, rows, 20_000)}")
            print(f"  with Parquet    {_record_cost(fresh(), rows, 20_000)}")


if __name__ == "__main__":
    main()
