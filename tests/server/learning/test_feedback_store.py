"""The feedback store: durable, idempotent, group-committed, crash-safe, compacted to Parquet,
and back by itself after a full disk is freed.

Real SQLite and Parquet files under tmp_path, a real tmpfs filled to the last byte, real child
processes killed with SIGKILL; no mocks."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from learning_helpers import fill_disk, tmpfs

from xylen_server.errors import Unavailable
from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.samples import DB_NAME, FeedbackRecord

CHILD = Path(__file__).with_name("feedback_child.py")
REPO = Path(__file__).resolve().parents[3]


def record(i: int, prefix: str = "p") -> FeedbackRecord:
    features = (np.arange(6, dtype=np.float32) - i) / np.float32(3)
    return FeedbackRecord(
        f"{prefix}-{i}", "model_1", 2, features, 0.61, 1, 10.0 * i, 0.01 * (i % 3 - 1),
        1_700_000_000_000 + i, 1_700_000_001_000 + i, int(i % 3 - 1 > 0),
    )  # fmt: skip


def ids_of(store: FeedbackStore) -> list[str]:
    return store.read_samples()["prediction_id"].to_list()


def ids_of_range(n: int) -> list[str]:
    return [f"p-{i}" for i in range(n)]


def uncompacted_rows(directory: Path) -> int:
    """Samples still in the SQLite file (read with the sqlite3 module, as an operator would)."""
    with sqlite3.connect(directory / DB_NAME) as db:
        return int(db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])


# -- round trip, idempotence ------------------------------------------------------------------


def test_round_trip_through_sqlite_and_parquet(tmp_path: Path) -> None:
    records = [record(i) for i in range(20)]
    with FeedbackStore(tmp_path, compact_on_close=False) as store:
        for i, rec in enumerate(records[:10]):
            result = store.append(rec)
            assert not result.duplicate and result.stored_samples == i + 1
        store.compact()
        for rec in records[10:]:
            store.append(rec)
        frame_ = store.read_samples()  # half in Parquet, half in SQLite
        assert store.count() == 20
    assert frame_["prediction_id"].to_list() == [r.prediction_id for r in records]
    for rec, row in zip(records, frame_.iter_rows(named=True), strict=True):
        assert np.array_equal(np.array(row["features"], np.float32), rec.features)
        assert row["pnl"] == rec.pnl and row["realized_return"] == rec.realized_return
        assert row["label"] == (1 if rec.realized_return > 0 else 0)
        assert row["close_time"] == datetime.fromtimestamp(rec.close_time_ms / 1000, UTC)
    with FeedbackStore(tmp_path) as reopened:
        assert reopened.read_samples().equals(frame_)


def test_same_prediction_id_is_stored_once(tmp_path: Path) -> None:
    with FeedbackStore(tmp_path, compact_on_close=False) as store:
        assert store.append(record(1)).duplicate is False
        again = store.append(record(1))
        assert again.duplicate is True and again.stored_samples == 1
        store.compact()
        store.append(record(2))
        assert 1 not in store and "p-1" in store and "p-2" in store and "p-3" not in store
    with FeedbackStore(tmp_path) as store:  # p-1 is in Parquet, p-2 in SQLite
        assert store.append(record(1)).duplicate
        assert store.append(record(2)).duplicate
        assert store.count() == 2
    with FeedbackStore(tmp_path) as store:  # both in Parquet now: the ids stay in SQLite
        assert uncompacted_rows(tmp_path) == 0
        assert store.append(record(1)).duplicate and store.append(record(2)).duplicate
        assert ids_of(store) == ["p-1", "p-2"]


def test_concurrent_duplicates_store_one(tmp_path: Path) -> None:
    results = []
    with FeedbackStore(tmp_path) as store:
        threads = [
            threading.Thread(target=lambda: results.append(store.append(record(7))))
            for _ in range(16)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(r.duplicate for r in results) == [False] + [True] * 15
        assert store.count() == 1


# -- group commit -----------------------------------------------------------------------------


@pytest.mark.parametrize("group_commit", [True, False])
def test_many_concurrent_appenders(tmp_path: Path, group_commit: bool) -> None:
    workers, each = 32, 20
    with FeedbackStore(tmp_path, group_commit=group_commit, compact_on_close=False) as store:

        def work(worker: int) -> None:
            for i in range(each):
                assert not store.append(record(worker * 1000 + i)).duplicate

        threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert store.count() == workers * each
        if group_commit:
            assert store.commit_count < workers * each / 2
        else:
            assert store.commit_count == workers * each
    with FeedbackStore(tmp_path) as store:
        ids = ids_of(store)
        assert len(ids) == len(set(ids)) == workers * each


def test_async_appends_share_commits_without_blocking_the_loop(tmp_path: Path) -> None:
    async def main(store: FeedbackStore) -> tuple[list[bool], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(store.append_async(record(i)) for i in range(200)))
        duplicate = await store.append_async(record(3))
        tick_task.cancel()
        return [r.duplicate for r in results] + [duplicate.duplicate], ticks

    with FeedbackStore(tmp_path) as store:
        duplicates, ticks = asyncio.run(main(store))
        assert duplicates == [False] * 200 + [True]
        assert store.count() == 200 and store.commit_count < 100
        assert ticks > store.commit_count  # the loop kept running while commits were pending


def test_async_append_without_group_commit(tmp_path: Path) -> None:
    async def main(store: FeedbackStore) -> list[bool]:
        results = await asyncio.gather(*(store.append_async(record(i)) for i in range(20)))
        return [r.duplicate for r in results]

    with FeedbackStore(tmp_path, group_commit=False) as store:
        assert asyncio.run(main(store)) == [False] * 20
        assert store.commit_count == 20


# -- failures -------------------------------------------------------------------------------


def test_a_record_that_cannot_be_stored_fails_alone(tmp_path: Path) -> None:
    bad = FeedbackRecord("bad", "model_1", 1, np.zeros(3, np.float32), None, None,
                         float("nan"), 0.0, 1, 1, 0)  # fmt: skip
    with FeedbackStore(tmp_path) as store:
        good = threading.Thread(target=lambda: [store.append(record(i)) for i in range(50)])
        good.start()
        with pytest.raises(ValueError, match="not finite"):
            store.append(bad)
        good.join()
        assert store.count() == 50 and "bad" not in store


def test_a_full_disk_fails_the_commit_and_the_store_recovers_once_freed(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "2m") as disk, FeedbackStore(disk / "store") as store:
        for i in range(5):
            store.append(record(i))
        filler = fill_disk(disk)
        for attempt in range(3):  # it fails each time while the disk is full, and stays up
            with pytest.raises(Unavailable) as full:
                store.append(record(100 + attempt))
            assert full.value.reason == "FEEDBACK_STORE_FAILED"
            assert "full" in full.value.message
        filler.unlink()
        assert not store.append(record(200)).duplicate  # no restart needed
        assert store.append(record(4)).duplicate
        assert store.count() == 6
        assert sorted(ids_of(store)) == sorted([*ids_of_range(5), "p-200"])


def test_ids_come_from_the_parts_when_the_database_is_new(tmp_path: Path) -> None:
    """A directory whose parts were written without a database (the store before SQLite, or
    a lost database file) keeps answering its ids as duplicates."""
    with FeedbackStore(tmp_path) as store:
        for i in range(10):
            store.append(record(i))
    for path in tmp_path.glob(DB_NAME + "*"):
        path.unlink()
    with FeedbackStore(tmp_path) as store:
        assert store.count() == 10 and store.append(record(3)).duplicate
        assert not store.append(record(10)).duplicate
    parts = pl.read_parquet(tmp_path / "training_samples" / "*.parquet")
    assert sorted(parts["prediction_id"]) == sorted(ids_of_range(11))


# -- compaction -------------------------------------------------------------------------------


def test_compaction_writes_snappy_parquet_readable_by_polars_and_pyarrow(tmp_path: Path) -> None:
    with FeedbackStore(tmp_path, compact_on_close=False) as store:
        for i in range(30):
            store.append(record(i))
        before = store.read_samples()
        part = store.compact()
        assert part is not None and part.parent == tmp_path / "training_samples"
        assert store.read_samples().equals(before)
        assert store.compact() is None  # nothing left in SQLite
    assert uncompacted_rows(tmp_path) == 0
    metadata = pq.ParquetFile(part).metadata
    assert metadata.row_group(0).column(0).compression == "SNAPPY"
    assert pq.read_table(tmp_path / "training_samples").num_rows == 30
    frame_ = pl.read_parquet(tmp_path / "training_samples" / "*.parquet")
    assert frame_.equals(before)
    assert frame_.schema["features"] == pl.List(pl.Float32)


def test_a_file_the_store_did_not_write_is_not_taken_for_a_part(tmp_path: Path) -> None:
    # An operator's copy of a part beside it: not read twice as samples, not parsed for its
    # range (opening the store raised ValueError, and Feedback answered INTERNAL).
    with FeedbackStore(tmp_path, compact_on_close=False) as store:
        for i in range(10):
            store.append(record(i))
        part = store.compact()
    assert part is not None
    shutil.copy(part, part.with_name(part.stem + " (copy).parquet"))
    with FeedbackStore(tmp_path) as reopened:
        assert reopened.part_files() == [part]
        assert sorted(ids_of(reopened)) == sorted(f"p-{i}" for i in range(10))
        reopened.append(record(10))
        assert len(ids_of(reopened)) == 11


def test_automatic_compaction_by_row_count(tmp_path: Path) -> None:
    with FeedbackStore(tmp_path, compact_rows=50, compact_on_close=False) as store:
        for i in range(120):
            store.append(record(i))
        for _ in range(200):
            if len(store.part_files()) >= 2:
                break
            threading.Event().wait(0.01)
        assert len(store.part_files()) >= 2
        assert sorted(ids_of(store)) == sorted(f"p-{i}" for i in range(120))


@pytest.mark.parametrize("step", ["part_written", "part_renamed", "rows_deleted"])
def test_failed_compaction_loses_and_duplicates_nothing(tmp_path: Path, step: str) -> None:
    def hook(name: str) -> None:
        if name == step:
            raise OSError(f"injected failure at {name}")

    store = FeedbackStore(tmp_path, compact_on_close=False, fault_hook=hook)
    for i in range(10):
        store.append(record(i))
    with pytest.raises(OSError, match="injected"):
        store.compact()
    store.close()
    with FeedbackStore(tmp_path) as reopened:
        assert sorted(ids_of(reopened)) == sorted(f"p-{i}" for i in range(10))
    assert not list((tmp_path / "training_samples").glob("*.tmp"))


# -- crash: SIGKILL a writer mid-stream ------------------------------------------------------


def _child(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, text=True, env=env
    )


def _acknowledged(child: subprocess.Popen[str], kill_after: int | None) -> list[str]:
    assert child.stdout is not None
    acked: list[str] = []
    for line in child.stdout:
        if line.endswith("\n"):  # an id is acknowledged once its whole line is out
            acked.append(line[:-1])
        if kill_after is not None and len(acked) >= kill_after:
            child.send_signal(signal.SIGKILL)
            break
    acked += [line[:-1] for line in child.stdout if line.endswith("\n")]
    assert child.wait(timeout=30) == -signal.SIGKILL
    return acked


def _assert_exactly_once(directory: Path, acked: list[str]) -> None:
    with FeedbackStore(directory, compact_on_close=False) as store:
        ids = ids_of(store)
        assert len(ids) == len(set(ids)) == store.count()
        missing = set(acked) - set(ids)
        assert not missing, f"{len(missing)} acknowledged records lost"
    with FeedbackStore(directory) as store:  # still clean after a second open and compaction
        assert sorted(ids_of(store)) == sorted(ids)
    assert pl.read_parquet(directory / "training_samples" / "*.parquet").height == len(ids)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [300, 2500])
def test_sigkill_mid_stream_keeps_every_acknowledged_record(
    tmp_path: Path, kill_after: int
) -> None:
    # compact_rows=97 keeps the background compaction busy, so kills land in it too
    acked = _acknowledged(_child(str(tmp_path), "stream", "97"), kill_after)
    assert len(acked) >= kill_after
    _assert_exactly_once(tmp_path, acked)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["part_written", "part_renamed", "rows_deleted"])
def test_sigkill_during_compaction(tmp_path: Path, step: str) -> None:
    acked = _acknowledged(_child(str(tmp_path), "crash-at", step, "200"), None)
    assert len(acked) == 200
    _assert_exactly_once(tmp_path, acked)


# -- one process per store ---------------------------------------------------------------------


def test_a_second_opener_is_refused(tmp_path: Path) -> None:
    with FeedbackStore(tmp_path), pytest.raises(RuntimeError, match="open in another process"):
        FeedbackStore(tmp_path)
    FeedbackStore(tmp_path).close()  # free again once closed
