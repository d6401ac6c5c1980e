"""What the coordinator says while its outbox's disk is full: one warning line when a part's
use of the outbox begins to fail and one when it works again, however many attempts failed in
between, no traceback for the disk's failure; every failed attempt counted in
``xylen_coordinator_outbox_failures_total{part}``; the retries go on and the work is done once
there is room. The parts: the prediction log's write-behind (``prediction_log``) and the
forwarder recording its deliveries (``feedback_forwarding``). A real tmpfs filled to the last
byte (skipped, saying so, where one cannot be mounted), the real outbox SQLite file, the real
exporter."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from coordinator.helpers import endpoint, free_port, write_config
from learning_helpers import fill_disk, tmpfs
from prometheus_client import generate_latest

from xylen_coordinator.config import Adaptive, FeedbackQueueSettings, Retraining
from xylen_coordinator.coordinator import AsyncCoordinator
from xylen_coordinator.ensemble import AdaptiveWeights
from xylen_coordinator.feedback import Ledger
from xylen_coordinator.outbox import Outbox
from xylen_coordinator.results import RowDecision, VoteInfo
from xylen_coordinator.telemetry import CoordinatorTelemetry
from xylen_server.signals import Signal

ATTEMPTS = 8
"""Failed attempts to wait for in each full spell (one every 0.2 s)."""


def _row(i: int) -> RowDecision:
    vote = VoteInfo("m1", 0.7, Signal.BUY, 1.0, 1.0, 1.0, "model_1", 1, f"m1-{i:08d}", 0.0, None)
    return RowDecision(f"ens-{i:08d}", 0.7, Signal.BUY, 0.0, (vote,))


def _lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


class Exported:
    """The counters as the coordinator's metrics port exports them."""

    def __init__(self, tmp_path: Path) -> None:
        config = write_config(tmp_path / "config.yaml", [endpoint("m1", free_port(), 1.0)])
        self.coordinator = AsyncCoordinator(config)  # not started: its metrics and exporter
        self.telemetry = CoordinatorTelemetry(self.coordinator)

    def failures(self, part: str) -> int:
        return self.coordinator.metrics.outbox_failures().get(part, 0)

    def line(self, part: str) -> str:
        scraped = generate_latest(self.telemetry.meters.registry).decode()
        prefix = f'xylen_coordinator_outbox_failures_total{{part="{part}"}} '
        return next(line for line in scraped.splitlines() if line.startswith(prefix))


async def _wait(check, what: str) -> None:
    for _ in range(1200):  # a minute at most, then fail rather than hang
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def _one_warning_without_traceback(record: logging.LogRecord, subject: str) -> None:
    assert record.levelno == logging.WARNING
    assert not record.exc_info  # the disk's failure, not a bug: no traceback
    message = record.getMessage()
    assert message.startswith(f"{subject}: the outbox failed ("), message
    assert "full" in message and len(message) < 400, message


def test_a_full_disk_under_the_prediction_log_logs_one_line_per_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exported = Exported(tmp_path)
    logger = "xylen_coordinator.feedback"

    async def scenario(disk: Path) -> None:
        ledger = Ledger(AdaptiveWeights(Adaptive()), exported.coordinator.metrics)
        await ledger.open(FeedbackQueueSettings(path=disk / "feedback.sqlite3"), dict)
        total = 0
        try:
            for spell in range(2):  # full, recovered, full again, recovered again
                filler = fill_disk(disk)
                try:
                    for i in range(total, total + 3000):
                        ledger.remember(_row(i), 1_700_000_000.0 + i)
                    total += 3000
                    goal = (spell + 1) * ATTEMPTS
                    await _wait(
                        lambda goal=goal: exported.failures("prediction_log") >= goal, "failures"
                    )
                    lines = _lines(caplog, logger)
                    assert len(lines) == 2 * spell + 1, [r.getMessage() for r in lines]
                    _one_warning_without_traceback(lines[-1], "prediction log")
                    assert "ensemble predictions wait in memory" in lines[-1].getMessage()
                    assert "Traceback" not in caplog.text
                finally:
                    filler.unlink()
                goal = 2 * spell + 2
                await _wait(lambda goal=goal: len(_lines(caplog, logger)) >= goal, "recovery")
                lines = _lines(caplog, logger)
                assert len(lines) == goal, [r.getMessage() for r in lines]
                assert not ledger._unwritten  # the retries wrote what waited
                assert (
                    lines[-1]
                    .getMessage()
                    .startswith("prediction log: the outbox works again after ")
                )
            failures = exported.failures("prediction_log")
            assert failures >= 2 * ATTEMPTS
            assert exported.line("prediction_log").endswith(f" {float(failures)}")
        finally:
            await ledger.close()
        reopened = Outbox(disk / "feedback.sqlite3")
        try:
            found = [await reopened.run(reopened.find_prediction, _row(i).prediction_id)
                     for i in range(0, total, 11)]  # fmt: skip
        finally:
            await reopened.close()
        assert all(record is not None for record in found), sum(r is None for r in found)

    with caplog.at_level(logging.INFO), tmpfs(tmp_path / "disk", "1m") as disk:
        asyncio.run(scenario(disk))


def test_a_full_disk_under_the_forwarder_logs_one_line_per_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Outcomes due for a server the forwarder cannot reach: each pass records the failed
    deliveries in the outbox, and on a full disk that write fails, pass after pass."""
    exported = Exported(tmp_path)
    logger = "xylen_coordinator.outbox"
    queue = FeedbackQueueSettings(
        path=tmp_path / "disk" / "feedback.sqlite3",
        retry_initial_seconds=0.2,
        retry_max_seconds=0.2,
    )
    now = Retraining(enabled=True, send_feedback_to_models=True, feedback_delay_seconds=0.0)

    async def scenario(disk: Path) -> None:
        ledger = Ledger(AdaptiveWeights(Adaptive()), exported.coordinator.metrics)
        await ledger.open(queue, dict)  # no client: every delivery fails and is rescheduled
        try:
            for i in range(50):
                ledger.remember(_row(i), 1_700_000_000.0 + i)
                await ledger.accept(_row(i).prediction_id, None, now, realized_return=0.01)
            await _wait(lambda: ledger.delivery_retries() >= 50, "a try of every delivery")
            filler = fill_disk(disk)
            try:
                await _wait(
                    lambda: exported.failures("feedback_forwarding") >= ATTEMPTS, "failed passes"
                )
                lines = _lines(caplog, logger)
                assert len(lines) == 1, [r.getMessage() for r in lines]
                _one_warning_without_traceback(lines[0], "feedback forwarding")
                assert "outcomes stay queued, retried every 0.2s" in lines[0].getMessage()
                assert "Traceback" not in caplog.text
            finally:
                filler.unlink()
            await _wait(lambda: len(_lines(caplog, logger)) >= 2, "recovery")
            assert len(_lines(caplog, logger)) == 2
            assert (
                _lines(caplog, logger)[1]
                .getMessage()
                .startswith("feedback forwarding: the outbox works again after ")
            )
            assert await ledger.pending() == 50  # still queued for the server, none lost
            failures = exported.failures("feedback_forwarding")
            assert exported.line("feedback_forwarding").endswith(f" {float(failures)}")
        finally:
            await ledger.close()

    with caplog.at_level(logging.INFO), tmpfs(tmp_path / "disk", "8m") as disk:
        asyncio.run(scenario(disk))
