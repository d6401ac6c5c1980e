"""The coordinator's prediction log on a full disk: ensemble predictions whose write-behind
failed are written once the disk has room, so an outcome for one of them is still matched after
a restart. A real tmpfs filled to the last byte (skipped, saying so, where one cannot be
mounted), the real outbox SQLite file."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from learning_helpers import fill_disk, tmpfs

from xylen_coordinator.config import Adaptive, FeedbackQueueSettings
from xylen_coordinator.ensemble import AdaptiveWeights
from xylen_coordinator.feedback import Ledger
from xylen_coordinator.outbox import Outbox
from xylen_coordinator.results import RowDecision, VoteInfo
from xylen_server.signals import Signal


def _row(i: int) -> RowDecision:
    vote = VoteInfo("m1", 0.7, Signal.BUY, 1.0, 1.0, 1.0, "model_1", 1, f"m1-{i:08d}", 0.0, None)
    return RowDecision(f"ens-{i:08d}", 0.7, Signal.BUY, 0.0, (vote,))


def test_predictions_whose_write_failed_are_written_once_the_disk_has_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The write-behind took its batch off the queue before writing it; a failed write (a full
    disk) lost those predictions from the outbox for good, and an outcome for one of them after
    a restart was PREDICTION_NOT_FOUND. Fails before, passes after."""

    async def scenario(disk: Path) -> None:
        ledger = Ledger(AdaptiveWeights(Adaptive()))
        await ledger.open(FeedbackQueueSettings(path=disk / "feedback.sqlite3"), dict)
        filler = fill_disk(disk)
        try:
            for i in range(3000):
                ledger.remember(_row(i), 1_700_000_000.0 + i)
            while not ledger.metrics.outbox_failures().get("prediction_log"):
                await asyncio.sleep(0.05)  # the write-behind tried, and the disk was full
        finally:
            filler.unlink()
        await ledger.close()  # writes what is waiting
        reopened = Outbox(disk / "feedback.sqlite3")
        try:
            found = [await reopened.run(reopened.find_prediction, _row(i).prediction_id)
                     for i in range(0, 3000, 7)]  # fmt: skip
        finally:
            await reopened.close()
        assert all(record is not None for record in found), sum(r is None for r in found)

    with caplog.at_level(logging.ERROR), tmpfs(tmp_path / "disk", "1m") as disk:
        asyncio.run(scenario(disk))


def test_closing_on_a_full_disk_still_closes_the_outbox(tmp_path: Path) -> None:
    """The last write of the prediction log failing at close raised out of Ledger.close
    before the outbox was closed (its database thread left running). Fails before, passes
    after."""

    async def scenario(disk: Path) -> None:
        ledger = Ledger(AdaptiveWeights(Adaptive()))
        await ledger.open(FeedbackQueueSettings(path=disk / "feedback.sqlite3"), dict)
        outbox = ledger._outbox
        assert outbox is not None
        filler = fill_disk(disk)
        try:
            for i in range(3000):
                ledger.remember(_row(i), 1_700_000_000.0 + i)
            await ledger.close()  # logs the failed write
            assert outbox._db is None and outbox._executor._shutdown
        finally:
            filler.unlink()

    with tmpfs(tmp_path / "disk", "1m") as disk:
        asyncio.run(scenario(disk))
