"""The prediction log on a full disk: a part that cannot be written keeps its rows for the next
flush (nothing said is missing from the history once the disk has room), leaves no partial file
behind to hold the space, and what it keeps while the disk stays full is bounded. A real tmpfs
filled to the last byte (skipped, saying so, where one cannot be mounted)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from learning_helpers import fill_disk, learning_settings, python_calls, tmpfs

from xylen_server.learning.feedback import FeedbackLoop
from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.prediction_log import PredictionLog


def _record(log: PredictionLog, start: int, n: int) -> list[str]:
    ids = [f"0123456789ab-{i:x}" for i in range(start, start + n)]
    features = np.random.default_rng(start).standard_normal((n, 25)).astype(np.float32)
    log.record(ids, features, np.full(n, 0.5), np.full(n, 3), "model_1", 1)
    return ids


def test_rows_of_a_part_that_could_not_be_written_reach_the_next_one(tmp_path: Path) -> None:
    """A failed write took its rows off the buffer all the same (the log said "rows stay
    buffered for retry"): a full disk for one flush lost them from the history for good, and
    the partial .tmp stayed, holding the space the next flush needed. Fails before, passes
    after."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        log = PredictionLog(disk / "log", flush_interval_seconds=3600, max_rows=10_000)
        try:
            said = _record(log, 0, 3000)
            assert log.flush() is not None  # a part while the disk had room
            said += _record(log, 3000, 2000)
            filler = fill_disk(disk)
            with pytest.raises(OSError):
                log.flush()
            assert list((disk / "log").glob("*.tmp")) == []  # no partial part holds the disk
            said += _record(log, 5000, 500)  # predictions go on meanwhile
            filler.unlink()
            assert log.flush() is not None
            assert log.read()["prediction_id"].to_list() == said
            assert log.dropped_rows == 0
        finally:
            log.close()


def test_what_a_full_disk_keeps_waiting_is_bounded_and_counted(tmp_path: Path) -> None:
    """While the disk stays full the rows waiting for it are at most the ring's capacity (the
    oldest go first, counted in ``dropped_rows``); the newest reach the history once it has
    room."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        log = PredictionLog(disk / "log", flush_interval_seconds=3600, max_rows=1000)
        try:
            filler = fill_disk(disk)
            said: list[str] = []
            for start in range(0, 5000, 250):
                said += _record(log, start, 250)
                with pytest.raises(OSError):
                    log.flush()
            assert log.spilled_pending <= 1000
            assert log.dropped_rows == 5000 - log.spilled_pending
            filler.unlink()
            assert log.flush() is not None
            kept = log.read()["prediction_id"].to_list()
            assert kept == said[len(said) - len(kept) :]
            assert len(kept) + log.dropped_rows == 5000
        finally:
            log.close()


def test_the_flusher_retries_a_failed_write_after_its_interval_not_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows kept for a retry are more than ``flush_rows``: the flusher must not take that as
    a reason to write again at once (a loop of failing writes and stack traces for as long as
    the disk is full), but wait its interval."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        filler = fill_disk(disk)
        log = PredictionLog(disk / "log", flush_rows=10, flush_interval_seconds=3600, max_rows=1000)
        try:
            _record(log, 0, 100)  # past flush_rows: the flusher is woken and fails
            while not caplog.records:
                time.sleep(0.01)
            time.sleep(0.3)  # a flusher retrying at once fails hundreds of times meanwhile
            failures = [r for r in caplog.records if "flush failed" in r.getMessage()]
            assert len(failures) == 1
            assert log.spilled_pending == 100
        finally:
            filler.unlink()
            log.close()
        assert len(log.read()) == 100


def test_closing_the_feedback_loop_on_a_full_disk_still_closes_its_store(tmp_path: Path) -> None:
    """The last flush of the prediction log failing at shutdown raised out of
    FeedbackLoop.close before the feedback store was closed: the server's SIGTERM ended in a
    traceback with the store still open (and locked). Fails before, passes after."""
    (tmp_path / "models").mkdir()
    with tmpfs(tmp_path / "data", "2m") as data:
        loop = FeedbackLoop(learning_settings(tmp_path, feedback_data_dir=data))
        store = loop.require_store()
        _record(loop.log, 0, 2000)
        filler = fill_disk(data)
        try:
            loop.close()  # logs the failed flush, closes the store
            reopened = FeedbackStore(store.directory)  # its lock was released
            reopened.close()
        finally:
            filler.unlink()


def test_a_long_full_disk_does_not_slow_recording(tmp_path: Path) -> None:
    """Each failed flush kept its rows as one more batch, and record() sums the batches'
    lengths on every call: a day of failed flushes every 5 s made every Predict walk 17,000
    batches. They are joined now (one per feature width). Measured without a clock: the
    Python calls of one record() after 3 and after 120 failed flushes: 27 and 259 before
    (fails before), the same now (passes after). The rows
    of two feature widths kept across the failures all reach the history."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        log = PredictionLog(disk / "log", flush_interval_seconds=3600, max_rows=10_000)
        filler = fill_disk(disk)
        said: list[str] = []
        try:
            said += _record(log, 0, 5)
            narrow = [f"narrow-{i}" for i in range(3)]  # a model of another width, once
            log.record(narrow, np.zeros((3, 7), np.float32), [0.5] * 3, [3] * 3, "model_2", 1)
            said += narrow
            calls = []
            for start in range(5, 125):
                said += _record(log, start * 10, 1)
                with pytest.raises(OSError):
                    log.flush()
                if start in (8, 124):
                    _, counted = python_calls(lambda start=start: _record(log, 100_000 + start, 1))
                    said.append(f"0123456789ab-{100_000 + start:x}")
                    calls.append(counted)
            assert calls[1] <= calls[0], calls
            assert log.dropped_rows == 0
        finally:
            filler.unlink()
        assert log.flush() is not None
        assert sorted(log.read()["prediction_id"].to_list()) == sorted(said)
        log.close()
