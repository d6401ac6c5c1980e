"""What the coordinator says while its prediction log cannot be written (a full disk): one
warning line when the writes begin to fail and one when they work again, however many attempts
failed in between, no traceback for the disk's failure; every failed attempt counted in
``xylen_coordinator_prediction_log_write_failures_total``; the retries go on and the
predictions are written once there is room. A real tmpfs filled to the last byte (skipped,
saying so, where one cannot be mounted), the real outbox SQLite file, the real exporter."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from coordinator.helpers import endpoint, free_port, write_config
from learning_helpers import fill_disk, tmpfs
from prometheus_client import generate_latest

from xylen_coordinator.config import Adaptive, FeedbackQueueSettings
from xylen_coordinator.coordinator import AsyncCoordinator
from xylen_coordinator.ensemble import AdaptiveWeights
from xylen_coordinator.feedback import Ledger
from xylen_coordinator.outbox import Outbox
from xylen_coordinator.results import RowDecision, VoteInfo
from xylen_coordinator.telemetry import CoordinatorTelemetry
from xylen_server.signals import Signal

ATTEMPTS = 8
"""Failed writes to wait for in each full spell (one every 0.2 s)."""


def _row(i: int) -> RowDecision:
    vote = VoteInfo("m1", 0.7, Signal.BUY, 1.0, 1.0, 1.0, "model_1", 1, f"m1-{i:08d}", 0.0, None)
    return RowDecision(f"ens-{i:08d}", 0.7, Signal.BUY, 0.0, (vote,))


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "xylen_coordinator.feedback"]


def test_a_full_disk_logs_one_line_per_change_and_counts_every_failed_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path / "config.yaml", [endpoint("m1", free_port(), 1.0)])
    coordinator = AsyncCoordinator(config)  # not started: only its metrics and exporter
    telemetry = CoordinatorTelemetry(coordinator)

    def exported() -> str:
        scraped = generate_latest(telemetry.meters.registry).decode()
        return next(
            line
            for line in scraped.splitlines()
            if line.startswith("xylen_coordinator_prediction_log_write_failures_total ")
        )

    async def wait_for_failures(ledger: Ledger, count: int) -> None:
        while ledger.metrics.prediction_log_write_failures < count:
            await asyncio.sleep(0.05)

    async def wait_written(ledger: Ledger) -> None:
        while ledger._unwritten:
            await asyncio.sleep(0.05)

    async def scenario(disk: Path) -> None:
        ledger = Ledger(AdaptiveWeights(Adaptive()), coordinator.metrics)
        await ledger.open(FeedbackQueueSettings(path=disk / "feedback.sqlite3"), dict)
        total = 0
        try:
            for spell in range(2):  # full, recovered, full again, recovered again
                filler = fill_disk(disk)
                try:
                    for i in range(total, total + 3000):
                        ledger.remember(_row(i), 1_700_000_000.0 + i)
                    total += 3000
                    await wait_for_failures(ledger, (spell + 1) * ATTEMPTS)
                    lines = _lines(caplog)
                    assert len(lines) == 2 * spell + 1, [r.getMessage() for r in lines]
                    full = lines[-1]
                    assert full.levelno == logging.WARNING
                    assert not full.exc_info  # the disk's failure, not a bug: no traceback
                    message = full.getMessage()
                    assert message.startswith("prediction log: cannot write to the outbox (")
                    assert "full" in message and len(message) < 400, message
                    assert "Traceback" not in caplog.text
                finally:
                    filler.unlink()
                await wait_written(ledger)  # the retries went on and wrote what waited
                lines = _lines(caplog)
                assert len(lines) == 2 * spell + 2, [r.getMessage() for r in lines]
                assert (
                    lines[-1]
                    .getMessage()
                    .startswith("prediction log: writing to the outbox again after ")
                )
            failures = ledger.metrics.prediction_log_write_failures
            assert failures >= 2 * ATTEMPTS
            assert exported() == (
                f"xylen_coordinator_prediction_log_write_failures_total {float(failures)}"
            )
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
