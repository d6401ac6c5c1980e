"""The prediction log's memory: compact rows in a preallocated ring, bounded by its settings
(rows and bytes), and no row lost from the Parquet history when the ring wraps or the flusher
falls behind."""

from __future__ import annotations

import gc
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from xylen_server.learning.prediction_log import ID_BYTES, PredictionLog, row_bytes


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def rows(start: int, n: int, width: int = 25) -> tuple[list[str], np.ndarray]:
    ids = [f"0123456789ab-{start + i:x}" for i in range(n)]  # the server's id shape
    return ids, np.random.default_rng(start).standard_normal((n, width)).astype(np.float32)


def record(log: PredictionLog, start: int, n: int, width: int = 25, version: int = 1) -> None:
    ids, features = rows(start, n, width)
    log.record(ids, features, np.linspace(0, 1, n), np.full(n, 3), "model_1", version)


def test_a_row_takes_a_fixed_small_number_of_bytes() -> None:
    assert row_bytes(25) == 183  # was ~1.3 KiB a row as a dict of per-batch objects
    log = PredictionLog(None, max_rows=1000)
    record(log, 0, 1)
    # the ring is allocated whole at the first row: its arrays are the whole cost
    assert 1000 * row_bytes(25) <= log.memory_bytes() <= 1000 * row_bytes(25) + 1024 * 8 * 2


def test_the_byte_cap_binds_when_it_allows_fewer_rows_than_the_row_cap() -> None:
    log = PredictionLog(None, max_rows=1_000_000, max_bytes=100 * row_bytes(25))
    assert log.capacity_for(25) == 100
    for b in range(30):
        record(log, b * 7, 7)
    assert len(log) == 100
    assert log.memory_bytes() <= 2 * 100 * row_bytes(25)  # the index rounds up to a power of 2
    assert log.get("0123456789ab-0") is None
    assert log.get(f"0123456789ab-{30 * 7 - 1:x}") is not None


def test_python_heap_does_not_grow_with_rows_once_the_ring_is_full() -> None:
    """tracemalloc counts every allocation numpy and Python make: after the first fill, a
    hundred thousand more rows allocate nothing that stays."""
    log = PredictionLog(None, max_rows=5_000)
    for i in range(5_000):
        record(log, i, 1)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(5_000, 25_000):
            record(log, i, 1)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(log) == 5_000
    assert grown < 64 * 1024, grown  # 20,000 rows as dict entries would be ~26 MB


@pytest.mark.parametrize("size", [5, 50])  # one row at a time, and the vectorised index
def test_rows_answer_exactly_across_the_wrap(size: int) -> None:
    log = PredictionLog(None, max_rows=64 * size // 5)
    for b in range(40):
        record(log, b * size, size, version=b)
    newest, held = 40 * size, 64 * size // 5
    for i in range(newest - held, newest):
        row = log.get(f"0123456789ab-{i:x}")
        assert row is not None, i
        _, features = rows((i // size) * size, size)
        assert np.array_equal(row.features, features[i % size])
        assert row.model_version == i // size and row.model_name == "model_1"
    assert log.get(f"0123456789ab-{newest - held - 1:x}") is None


@pytest.mark.parametrize("padding", [0, 20])  # one row at a time, and the vectorised index
def test_long_and_unusual_ids_round_trip(tmp_path: Path, padding: int) -> None:
    long_id = "x" * (ID_BYTES + 40)
    odd = ["é-" * 3, "ends-with-nul\0", long_id, "", "short"] + [f"p{i}" for i in range(padding)]
    n = len(odd)
    with PredictionLog(tmp_path) as log:
        log.record(odd, np.ones((n, 3), np.float32), [0.1] * n, [1] * n, "m", 1)
        for prediction_id in odd:
            found = log.get(prediction_id)
            assert found is not None and found.prediction_id == prediction_id
    assert PredictionLog(tmp_path).read()["prediction_id"].to_list() == odd


@pytest.mark.parametrize("batch", [1, 7, 250])
def test_every_row_reaches_parquet_when_the_ring_wraps_before_a_flush(
    tmp_path: Path, batch: int
) -> None:
    """The flusher takes the buffered rows from the ring; rows about to be overwritten first
    are spilled to a pending table, and a batch bigger than the ring is kept whole too."""
    log = PredictionLog(tmp_path, max_rows=100, flush_rows=10**6, flush_interval_seconds=3600)
    total = 0
    for b in range(12):
        record(log, total, batch, version=b)
        total += batch
    assert len(log) == min(100, total)
    # A batch's rows beyond the ring are always spilled; those in it are spilled too when the
    # next batch comes before the flusher took them, which, since spilled rows wake it, depends
    # on the flusher thread's timing.
    assert log.spilled_rows >= 12 * max(0, batch - 100)
    log.close()
    frame = PredictionLog(tmp_path).read()
    assert frame["prediction_id"].to_list() == [f"0123456789ab-{i:x}" for i in range(total)]
    first = rows(0, batch)[1]
    assert np.array_equal(np.asarray(frame["features"][0].to_list(), np.float32), first[0])


def test_a_model_with_another_feature_count_starts_a_new_ring(tmp_path: Path) -> None:
    with PredictionLog(tmp_path) as log:
        record(log, 0, 3, width=25)
        record(log, 3, 2, width=10)
        assert log.get("0123456789ab-0") is None  # the old width's rows left memory
        row = log.get("0123456789ab-4")
        assert row is not None and row.features.shape == (10,)
    widths = [len(f) for f in PredictionLog(tmp_path).read()["features"].to_list()]
    assert widths == [25, 25, 25, 10, 10]


def test_forgotten_ids_cost_a_bounded_probe() -> None:
    """Index entries are never emptied, only reused: a lookup of an unknown id still ends."""
    log = PredictionLog(None, max_rows=32)
    for i in range(5_000):
        record(log, i, 1)
    assert all(log.get(f"0123456789ab-{i:x}") is None for i in range(0, 4_900, 7))
    assert sum(log.get(f"0123456789ab-{i:x}") is not None for i in range(4_968, 5_000)) >= 31


@pytest.mark.parametrize("batch", [1, 50])  # one row at a time, and the vectorised index
def test_every_held_row_is_found_however_its_ids_hash(batch: int) -> None:
    """The id index never gives up on a crowded stretch: a row still held is always found.
    (It once stopped after 16 probes and overwrote a live entry: with string hashing seeded
    per process, a handful of every few thousand held rows could not be found, a Feedback
    for them then missing its prediction.) Enough rows that linear probing's clusters reach
    well past 16 entries whatever this process's hash seed."""
    capacity = 16_384
    log = PredictionLog(None, max_rows=capacity)
    total = 3 * capacity // batch * batch
    features = np.zeros((batch, 3), np.float32)
    for start in range(0, total, batch):
        ids = [f"0123456789ab-{i:x}" for i in range(start, start + batch)]
        log.record(ids, features, [0.5] * batch, [1] * batch, "model_1", 1)
    assert len(log) == capacity
    lost = [i for i in range(total - capacity, total) if log.get(f"0123456789ab-{i:x}") is None]
    assert lost == []
    assert log.get(f"0123456789ab-{total - capacity - 1:x}") is None
