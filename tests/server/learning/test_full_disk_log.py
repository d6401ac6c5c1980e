"""What a model server says while the disks under its background writers are full: one warning
when a writer begins to fail and one when it works again, however many attempts failed in
between, no traceback for the disk's failure; every failed attempt counted in
``xylen_storage_failures_total{part}`` on the metrics port; the retries go on, and what
was said (predictions) and acknowledged (Feedback) during the outage reaches its Parquet parts
once there is room. The writers: the prediction log's flusher (``prediction_log``) and the
feedback store's compaction (``feedback_compaction``). The same rule as the coordinator's
(:class:`xylen_server.trouble.Trouble`, ``tests/coordinator/test_ledger_full_disk_log.py``).

A real server on a loopback port; its prediction log and its Parquet samples each on a real
tmpfs filled to the last byte (skipped, saying so, where one cannot be mounted); the feedback
store's SQLite file on the ordinary disk, so Feedback is acknowledged all along while every
compaction fails."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import polars as pl
import pytest
from harness import InProcessServer, feature_input, write_model
from learning_helpers import feedback, fill_disk, learning_settings, tmpfs
from metrics_page import by_label, scrape

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc

LOG = "xylen_server.learning.prediction_log"
STORE = "xylen_server.learning.feedback_store"
FLUSH_ATTEMPTS = 10
"""Failed flushes to wait for while the disk is full (one every 0.2 s)."""
COMPACTION_ATTEMPTS = 3
"""Failed compactions to wait for (one after a commit, at most one a second)."""


def _failures(port: int) -> dict[str, float]:
    """``xylen_storage_failures_total`` by part, as the metrics port exports it."""
    return by_label(scrape(port), "xylen_storage_failures_total", "part")


def _warnings(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


def _one_warning_without_traceback(record: logging.LogRecord, start: str) -> None:
    assert record.levelno == logging.WARNING
    assert not record.exc_info  # the disk's failure, not a bug: no traceback
    message = record.getMessage()
    assert message.startswith(start), message
    assert "No space left on device" in message and len(message) < 400, message


def test_full_disks_under_the_servers_writers_log_one_line_per_change(
    tmp_path: Path, candles, feature_rows, caplog: pytest.LogCaptureFixture
) -> None:
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=10)
    settings = learning_settings(
        tmp_path,
        prediction_log_dir=tmp_path / "prediction_log",
        prediction_log_flush_interval_seconds=0.2,
        feedback_compact_rows=1,  # every commit asks for a compaction
        feedback_slow_commit_ms=0,  # a loaded machine's slow commit is not this test's line
    )
    samples = settings.learning_dir / "training_samples"
    said: list[str] = []
    acknowledged: list[str] = []

    with (
        caplog.at_level(logging.INFO),
        tmpfs(settings.prediction_log_path, "1m") as log_disk,
        tmpfs(samples, "1m") as samples_disk,
    ):
        server = InProcessServer(settings)
        port = server.running.metrics_port
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.ModelServiceStub(channel)

                def trade(i: int) -> None:
                    """One prediction and the outcome of a trade taken on it."""
                    row = feature_rows[i % len(feature_rows)]
                    answer = stub.Predict(pb.PredictRequest(inputs=[feature_input(row)]))
                    prediction_id = answer.predictions[0].prediction_id
                    said.append(prediction_id)
                    stub.Feedback(feedback(prediction_id, 0.01 if i % 2 else -0.01))
                    acknowledged.append(prediction_id)

                def go_on_until(check: Callable[[], bool], what: str) -> None:
                    """Trade until ``check``; never more than one warning line per writer while
                    the disks stay full. A minute at most, then fail rather than hang."""
                    for _ in range(1200):
                        if check():
                            return
                        trade(len(said))
                        time.sleep(0.05)
                    raise AssertionError(f"never happened: {what}")

                for i in range(20):  # room on both disks: parts are written
                    trade(i)
                go_on_until(lambda: list(samples_disk.glob("part-*.parquet")), "a first part")

                fillers = [fill_disk(log_disk), fill_disk(samples_disk)]
                try:

                    def failed_long_enough() -> bool:
                        for logger in (LOG, STORE):  # checked after every trade
                            lines = _warnings(caplog, logger)
                            assert len(lines) <= 1, [r.getMessage() for r in lines]
                        counted = _failures(port)
                        return (
                            counted.get("prediction_log", 0) >= FLUSH_ATTEMPTS
                            and counted.get("feedback_compaction", 0) >= COMPACTION_ATTEMPTS
                        )

                    go_on_until(failed_long_enough, "failed flushes and compactions")
                    flush_failed = _warnings(caplog, LOG)
                    assert len(flush_failed) == 1
                    _one_warning_without_traceback(
                        flush_failed[0], "prediction log: the flush failed (OSError: "
                    )
                    assert "rows wait in memory" in flush_failed[0].getMessage()
                    compaction_failed = _warnings(caplog, STORE)
                    assert len(compaction_failed) == 1, [r.getMessage() for r in compaction_failed]
                    _one_warning_without_traceback(
                        compaction_failed[0], "feedback compaction: writing a part failed ("
                    )
                    assert "the samples stay in SQLite" in compaction_failed[0].getMessage()
                    assert "Traceback" not in caplog.text
                finally:
                    for filler in fillers:
                        filler.unlink()

                def recovered() -> bool:
                    return len(_warnings(caplog, LOG)) >= 2 and len(_warnings(caplog, STORE)) >= 2

                go_on_until(recovered, "both writers working again")
                last_said, last_acknowledged = len(said), len(acknowledged)
                subjects = {
                    LOG: "prediction log: the flush",
                    STORE: "feedback compaction: writing a part",
                }
                for logger, subject in subjects.items():
                    lines = _warnings(caplog, logger)
                    assert len(lines) == 2, [r.getMessage() for r in lines]
                    assert lines[1].getMessage().startswith(f"{subject} works again after ")
                    assert not lines[1].exc_info
                assert "Traceback" not in caplog.text
                counted = _failures(port)
                assert counted["prediction_log"] >= FLUSH_ATTEMPTS
                assert counted["feedback_compaction"] >= COMPACTION_ATTEMPTS
                assert counted["feedback_commit"] == 0  # SQLite's disk had room all along

                # What waited reaches the parts while the server runs: every prediction said
                # before the recovery, every outcome acknowledged before the compaction that
                # worked (the last trade's commit asked for it).
                def landed() -> bool:
                    logged = pl.read_parquet(str(log_disk / "part-*.parquet"))
                    stored = pl.read_parquet(str(samples_disk / "part-*.parquet"))
                    return set(said[:last_said]) <= set(logged["prediction_id"]) and set(
                        acknowledged[:last_acknowledged]
                    ) <= set(stored["prediction_id"])

                go_on_until(landed, "the rows kept during the outage in their parts")
        finally:
            server.close()
        logged = pl.read_parquet(str(log_disk / "part-*.parquet"))["prediction_id"].to_list()
        stored = pl.read_parquet(str(samples_disk / "part-*.parquet"))["prediction_id"].to_list()
    assert sorted(logged) == sorted(said)  # every prediction once, none lost
    assert sorted(stored) == sorted(acknowledged)  # every acknowledged outcome once
