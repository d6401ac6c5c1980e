"""The prediction log: bounded in memory, persisted as Snappy Parquet, replayed bit-exactly."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from xylen_server.learning.prediction_log import LoggedPrediction, PredictionLog


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def batch(start: int, rows: int, width: int = 5) -> tuple[list[str], np.ndarray]:
    ids = [f"id-{start + i}" for i in range(rows)]
    features = np.random.default_rng(start).standard_normal((rows, width)).astype(np.float32)
    return ids, features


def awkward_floats() -> np.ndarray:
    """float32 values that a careless round trip (text, float64 math) would change."""
    values = [
        np.float32(1) / np.float32(3),
        np.nextafter(np.float32(1), np.float32(2)),
        np.finfo(np.float32).max,
        np.finfo(np.float32).tiny,
        np.float32(1e-45),  # subnormal
        -0.0,
        123456.789,
        -7.1e-12,
    ]
    return np.array(values, dtype=np.float32).reshape(2, 4)


def test_get_returns_what_was_recorded() -> None:
    log = PredictionLog(None)
    ids, features = batch(0, 3)
    log.record(ids, features, [0.2, 0.5, 0.9], [2, 3, 1], "model_1", 7, time_ms=now_ms())
    row = log.get("id-2")
    assert isinstance(row, LoggedPrediction)
    assert (row.model_name, row.model_version, row.probability_up, row.signal) == (
        "model_1",
        7,
        0.9,
        1,
    )
    assert row.features.dtype == np.float32 and np.array_equal(row.features, features[2])
    assert log.get("unknown") is None


def test_memory_is_bounded_by_rows() -> None:
    log = PredictionLog(None, max_rows=300)
    for b in range(10):
        ids, features = batch(b * 100, 100)
        log.record(ids, features, np.full(100, 0.5), np.full(100, 3), "m", 1)
    assert len(log) <= 300
    assert log.get("id-0") is None and log.get("id-650") is None
    assert log.get("id-999") is not None


def test_memory_is_bounded_by_age() -> None:
    log = PredictionLog(None, max_age_seconds=60)
    old_ids, old = batch(0, 2)
    log.record(old_ids, old, [0.5, 0.5], [3, 3], "m", 1, time_ms=now_ms() - 120_000)
    assert log.get("id-0") is None  # too old to answer even before eviction
    new_ids, new = batch(10, 2)
    log.record(new_ids, new, [0.5, 0.5], [3, 3], "m", 1)
    assert len(log) == 2 and log.get("id-10") is not None


def test_persisted_rows_replay_bit_exactly(tmp_path: Path) -> None:
    features = awkward_floats()
    probabilities = np.array([0.1 + 1e-17, 2 / 3])
    with PredictionLog(tmp_path) as log:
        log.record(["a", "b"], features, probabilities, [2, 1], "model_1", 3, time_ms=1000)
        ids, more = batch(5, 4)
        log.record(ids, more, np.full(4, 0.5), np.full(4, 3), "model_1", 4, time_ms=2000)
    rows = list(PredictionLog(tmp_path).replay_rows(model_version=3))
    assert [r.prediction_id for r in rows] == ["a", "b"]
    for row, expected, probability in zip(rows, features, probabilities, strict=True):
        assert row.features.dtype == np.float32
        assert row.features.view(np.uint32).tolist() == expected.view(np.uint32).tolist()
        assert row.probability_up == probability and row.time_ms == 1000
    assert [r.prediction_id for r in PredictionLog(tmp_path).replay_rows(start_ms=1500)] == ids


def test_parquet_is_snappy_and_readable_by_polars_and_pyarrow(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path)
    ids, features = batch(0, 10)
    log.record(ids, features, np.linspace(0, 1, 10), np.full(10, 3), "model_1", 2)
    part = log.flush()
    log.close()
    assert part is not None and part.name.startswith("part-")
    assert pq.ParquetFile(part).metadata.row_group(0).column(0).compression == "SNAPPY"
    table = pq.read_table(tmp_path)
    assert table.column("prediction_id").to_pylist() == ids
    frame = pl.read_parquet(tmp_path / "*.parquet")
    assert frame.schema["features"] == pl.List(pl.Float32)
    assert np.array_equal(np.array(frame["features"].to_list(), dtype=np.float32), features)
    assert frame.equals(PredictionLog(tmp_path).read())


def test_flusher_writes_by_row_count_and_by_time(tmp_path: Path) -> None:
    by_rows = PredictionLog(tmp_path / "rows", flush_rows=50, flush_interval_seconds=60)
    ids, features = batch(0, 60)
    by_rows.record(ids, features, np.full(60, 0.5), np.full(60, 3), "m", 1)
    by_time = PredictionLog(tmp_path / "time", flush_rows=10_000, flush_interval_seconds=0.1)
    by_time.record(ids[:3], features[:3], [0.5] * 3, [3] * 3, "m", 1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (by_rows.part_files() and by_time.part_files()):
        time.sleep(0.02)
    assert by_rows.part_files() and by_time.part_files()
    by_rows.close()
    by_time.close()
    assert by_time.read().height == 3 and by_rows.read().height == 60


def test_reopening_continues_without_overwriting(tmp_path: Path) -> None:
    for start in (0, 100):
        with PredictionLog(tmp_path) as log:
            ids, features = batch(start, 5)
            log.record(ids, features, np.full(5, 0.5), np.full(5, 3), "m", 1)
    assert len(PredictionLog(tmp_path).part_files()) == 2
    assert PredictionLog(tmp_path).read().height == 10


def test_memory_only_log_persists_nothing(tmp_path: Path) -> None:
    log = PredictionLog(None)
    ids, features = batch(0, 2)
    log.record(ids, features, [0.5, 0.5], [3, 3], "m", 1)
    assert log.flush() is None and log.part_files() == [] and log.read().height == 0
    log.close()


def test_rows_let_go_by_a_change_of_width_are_written_at_once(tmp_path: Path) -> None:
    # A swap to a model of another feature width replaces the ring: the rows not yet written
    # are neither in memory nor on disk until the next flush. With a minute's interval a
    # Feedback for a prediction made just before the swap was NOT_FOUND for up to a minute;
    # the flusher now writes such rows at once.
    log = PredictionLog(tmp_path, flush_rows=1000, flush_interval_seconds=60, rollup_seconds=0)
    try:
        log.record(["old-1"], np.ones((1, 3), np.float32), [0.7], [1], "m", 1)
        log.record(["new-1"], np.ones((1, 4), np.float32), [0.6], [1], "m", 2)
        assert log.get("old-1") is None  # the ring is the new width's
        deadline = time.monotonic() + 10  # far less than the interval
        while (found := log.find_recent("old-1")) is None:
            assert time.monotonic() < deadline, "the spilled row was not written"
            time.sleep(0.02)
        assert found.model_version == 1 and found.features.tolist() == [1.0, 1.0, 1.0]
        assert log.get("new-1") is not None
    finally:
        log.close()
