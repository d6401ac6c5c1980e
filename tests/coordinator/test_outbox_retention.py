"""The coordinator's outbox keeps its rows for ``feedback_queue.retention_seconds`` and no
longer: a sweep (at start, every few minutes, or asked) deletes predictions older than the
retention and outcomes older than it whose deliveries are all finished, never an outcome with a
delivery pending, however old. A Feedback for a swept prediction is NOT_FOUND as for an unknown
id; a duplicate within the retention is still a duplicate; the rows removed are exported. Real
SQLite files, a real Outbox and Ledger, real recording model servers on loopback and a real
coordinator process; time is controlled by writing rows with past timestamps and by the sweep's
``now``, never by sleeping."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from coordinator.coordinator_process import CoordinatorProcess
from coordinator.helpers import endpoint, write_config
from coordinator.outbox_rows import (
    DAY,
    Prepared,
    outcome_bytes,
    prediction_row,
    refusal,
    wait_until,
)
from coordinator.recording_model_server import RecordingModelServer
from metrics_page import scrape, series_value, value, with_prefix

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator import Coordinator
from xylen_coordinator import feedback as feedback_module
from xylen_coordinator.config import (
    Adaptive,
    ConfigError,
    FeedbackQueueSettings,
    Retraining,
    parse_config,
)
from xylen_coordinator.ensemble import AdaptiveWeights
from xylen_coordinator.feedback import Ledger
from xylen_coordinator.outbox import SWEEP_BATCH
from xylen_coordinator.results import RowDecision, VoteInfo
from xylen_server.errors import NotFound
from xylen_server.signals import Signal

REPO = Path(__file__).resolve().parents[2]
WEEK = 7 * DAY
FAR = time.time() + 1e9
"""A due time the forwarder never reaches while a test runs."""


def _counts(path: Path) -> dict[str, int]:
    prepared = Prepared(path)
    try:
        counts: dict[str, int] = prepared.call(prepared.outbox.row_counts)
        return counts
    finally:
        prepared.close()


# -- the setting --------------------------------------------------------------------------


def test_retention_defaults_to_a_week_and_bad_values_name_the_key() -> None:
    raw: dict[str, Any] = {"model_endpoints": [endpoint("m1", 8001, 1.0)]}
    assert parse_config(raw).feedback_queue.retention_seconds == WEEK
    for good in (3600, 86400.5, 30 * DAY):
        raw["feedback_queue"] = {"retention_seconds": good}
        assert parse_config(raw).feedback_queue.retention_seconds == good
    for bad in (7, 0, -WEEK, "7d", float("nan"), True):
        raw["feedback_queue"] = {"retention_seconds": bad}
        with pytest.raises(ConfigError) as info:
            parse_config(raw)
        assert str(info.value).startswith("feedback_queue.retention_seconds: "), info.value
    # Both example configurations state it, and load.
    for example in (REPO / "config.example.yaml", REPO / "deploy" / "coordinator.yaml"):
        assert re.search(r"^  retention_seconds: 604800\b", example.read_text(), re.M), example
        raw = yaml.safe_load(example.read_text())
        raw.pop("auth", None)  # the deployed stack's token file exists in its container only
        assert parse_config(raw).feedback_queue.retention_seconds == WEEK


# -- the sweep on a real outbox -----------------------------------------------------------


def test_the_sweep_removes_old_rows_and_keeps_recent_ones_and_pending_deliveries(
    tmp_path: Path,
) -> None:
    """More old predictions than one batch, many sharing one ``created`` (one Predict of many
    rows) across batch boundaries; old outcomes delivered, failed, or with a delivery pending;
    recent ones; an old prediction whose outcome is recent."""
    path = tmp_path / "feedback.sqlite3"
    now = time.time()
    old, recent = now - WEEK - 3600, now - DAY
    prepared = Prepared(path)
    try:
        n_old = 2 * SWEEP_BATCH + 333
        prepared.predictions(
            [(f"old-{i}", old + i // 700, prediction_row(old + i // 700)) for i in range(n_old)]
        )
        prepared.predictions(
            [(f"new-{i}", recent + i, prediction_row(recent + i)) for i in range(500)]
        )
        prepared.outcome(
            "o-delivered", prediction_row(old), old, {"m1": "delivered", "m2": "delivered"}
        )
        prepared.outcome("o-failed", prediction_row(old), old, {"m1": "delivered", "m2": "failed"})
        prepared.outcome("o-no-target", prediction_row(old), old, {})
        prepared.outcome(
            "o-pending", prediction_row(old), old, {"m1": "delivered", "m2": "pending"}
        )
        prepared.outcome("o-recent", prediction_row(recent), recent, {"m1": "delivered"})
        prepared.outcome("o-late", prediction_row(old), recent, {"m1": "delivered"})
        before = prepared.call(prepared.outbox.row_counts)
    finally:
        prepared.close()
    assert before == {"predictions": n_old + 500 + 6, "outcomes": 6, "deliveries": 8}

    async def scenario() -> tuple[dict[str, int], dict[str, int], dict[str, int], list[Any]]:
        ledger = Ledger(AdaptiveWeights(Adaptive()))
        await ledger.open(FeedbackQueueSettings(path=path), dict)
        try:
            removed = await ledger.sweep()  # the start sweep may have run first: both count
            outbox = ledger._outbox
            assert outbox is not None
            after = await outbox.run(outbox.row_counts)
            found = [
                await outbox.run(outbox.find_prediction, pid)
                for pid in ("old-0", "old-1500", "new-0", "o-delivered", "o-pending", "o-late")
            ]
            return removed, ledger.metrics.pruned_rows(), after, found
        finally:
            await ledger.close()

    _, pruned, after, found = asyncio.run(scenario())
    # Gone: every old prediction without an outcome, the three finished old outcomes (one had
    # no delivery at all), their 3 deliveries and 3 predictions.
    assert pruned == {"predictions": n_old + 3, "outcomes": 3, "deliveries": 4}
    assert after == {"predictions": 500 + 3, "outcomes": 3, "deliveries": 4}
    assert [r is not None for r in found] == [False, False, True, False, True, True]
    assert _counts(path) == after  # committed


def test_an_old_pending_delivery_stays_is_delivered_and_only_then_goes(tmp_path: Path) -> None:
    """An outcome acknowledged 8 days ago whose server has refused it since: every sweep keeps
    it (and its prediction: a duplicate Feedback is still a duplicate); once the server takes
    it, it is delivered with the prediction id it was queued with, and the next sweep removes
    it. A real recording model server, a real coordinator."""
    path = tmp_path / "feedback.sqlite3"
    old = time.time() - WEEK - DAY
    prepared = Prepared(path)
    try:
        prepared.outcome("ens-stuck", prediction_row(old, ("m1",)), old, {"m1": "pending"})
    finally:
        prepared.close()
    server = RecordingModelServer("m1", 0.7, fail_feedback=10**9)
    try:
        config = write_config(
            tmp_path / "config.yaml",
            [endpoint("m1", server.port, 1.0)],
            feedback_queue={
                "path": str(path),
                "retry_initial_seconds": 0.1,
                "retry_max_seconds": 0.1,
            },
        )
        with Coordinator(config) as coordinator:
            wait_until(lambda: server.feedback_attempts >= 3, "refused deliveries")
            for _ in range(2):
                assert coordinator.sweep_outbox() == {
                    "predictions": 0,
                    "outcomes": 0,
                    "deliveries": 0,
                }
            assert coordinator.delivery_states("ens-stuck")["m1"][0] == "pending"
            ack = coordinator.feedback("ens-stuck", realized_return=0.02)
            assert ack.duplicate
            with server.lock:
                server.fail_feedback = 0
            wait_until(lambda: server.received(), "the delivery")
            wait_until(lambda: coordinator.pending_feedback() == 0, "nothing pending")
            (delivered,) = server.received()
            assert delivered.prediction_id == "m1-x"
            assert coordinator.delivery_states("ens-stuck")["m1"][0] == "delivered"
            assert coordinator.sweep_outbox() == {"predictions": 1, "outcomes": 1, "deliveries": 1}
            assert coordinator.delivery_states("ens-stuck") == {}
            with pytest.raises(NotFound) as gone:
                coordinator.feedback("ens-stuck", realized_return=0.02)
            assert gone.value.reason == "PREDICTION_NOT_FOUND"
    finally:
        server.close()
    assert _counts(path) == {"predictions": 0, "outcomes": 0, "deliveries": 0}


def test_a_remembered_prediction_past_the_retention_is_forgotten_in_memory_too(
    tmp_path: Path,
) -> None:
    """The ledger keeps the latest predictions in memory as well as on disk: a sweep forgets
    those past the retention in both, so a Feedback for one is NOT_FOUND, as the disk says."""
    vote = VoteInfo("m1", 0.7, Signal.BUY, 1.0, 1.0, 1.0, "model_1", 1, "m1-1", 0.0, None)
    retraining = Retraining(send_feedback_to_models=False)

    async def scenario() -> tuple[list[bool], dict[str, int], list[object]]:
        ledger = Ledger(AdaptiveWeights(Adaptive()))
        await ledger.open(FeedbackQueueSettings(path=tmp_path / "feedback.sqlite3"), dict)
        try:
            now = time.time()
            ledger.remember(RowDecision("ens-a", 0.7, Signal.BUY, 0.0, (vote,)), now)
            ledger.remember(RowDecision("ens-b", 0.7, Signal.BUY, 0.0, (vote,)), now)
            outbox = ledger._outbox
            assert outbox is not None
            for _ in range(600):  # written behind within 0.2 s; a minute at most
                if await outbox.run(outbox.find_prediction, "ens-b") is not None:
                    break
                await asyncio.sleep(0.05)
            acks = [
                (await ledger.accept("ens-a", None, retraining, realized_return=0.01)).duplicate
            ]
            await ledger.sweep(now + 1.0)  # within the retention: nothing goes
            acks.append(
                (await ledger.accept("ens-a", None, retraining, realized_return=0.01)).duplicate
            )
            removed = await ledger.sweep(now + WEEK + 3600)
            answers: list[object] = []
            for pid in ("ens-a", "ens-b"):
                try:
                    answers.append(await ledger.accept(pid, None, retraining, realized_return=0.01))
                except NotFound as refused:
                    answers.append(refused)
            return acks, removed, answers
        finally:
            await ledger.close()

    acks, removed, answers = asyncio.run(scenario())
    assert acks == [False, True]  # the second is a duplicate
    assert removed == {"predictions": 2, "outcomes": 1, "deliveries": 0}
    for refused in answers:
        assert isinstance(refused, NotFound), refused
        assert refused.reason == "PREDICTION_NOT_FOUND"
        assert "predictions are kept for 7 days" in str(refused)


def test_many_days_of_predictions_stay_bounded(tmp_path: Path) -> None:
    """40 simulated days at 5000 ensemble predictions a day, 1 % of them settled by an outcome
    delivered to two servers, one outcome a day stuck pending (its server is not configured), a
    sweep every 6 simulated hours: the rows stop growing at a week's worth, the stuck outcomes
    stay while their server has been gone less than the retention, then are abandoned (every
    one, counted) and go a retention after they arrived, and the file stops growing (SQLite
    reuses the freed pages)."""
    path = tmp_path / "feedback.sqlite3"
    per_day, days, sweeps_per_day = 5000, 40, 4
    start = time.time()  # simulated days ahead of the clock, so the start sweep leaves them
    history: list[tuple[int, dict[str, int], int]] = []
    abandoned: dict[str, int] = {}

    async def scenario() -> None:
        ledger = Ledger(AdaptiveWeights(Adaptive()))
        await ledger.open(FeedbackQueueSettings(path=path), dict)
        outbox = ledger._outbox
        assert outbox is not None
        try:
            for day in range(days):
                for part in range(sweeps_per_day):
                    n = per_day // sweeps_per_day
                    t0 = start + day * DAY + part * DAY / sweeps_per_day
                    step = DAY / sweeps_per_day / n
                    rows = [
                        (f"d{day}-{part}-{i}", t0 + i * step, prediction_row(t0 + i * step))
                        for i in range(n)
                    ]
                    await outbox.run(outbox.write_predictions, rows)
                    # Due far ahead, so the forwarder (no servers here) leaves them alone.
                    for pid, created, record in rows[:: n // (n // 100)][: n // 100]:
                        await outbox.run(
                            outbox.enqueue, pid, outcome_bytes(), record, ("m1", "m2"), created, FAR
                        )
                    settled = await outbox.run(outbox.due, FAR, 10**6)
                    await outbox.run(outbox.settle, [(d, "delivered", None, "") for d in settled])
                    stuck = prediction_row(t0, ("gone",))
                    await outbox.run(outbox.write_predictions, [(f"stuck-{day}-{part}", t0, stuck)])
                    if part == 0:
                        await outbox.run(
                            outbox.enqueue, f"stuck-{day}-{part}", outcome_bytes(), stuck,
                            ("gone",), t0, FAR + 1,
                        )  # fmt: skip
                    await ledger.sweep(t0 + DAY / sweeps_per_day)
                await outbox.run(outbox.db.execute, "PRAGMA wal_checkpoint(TRUNCATE)")
                history.append((day, await outbox.run(outbox.row_counts), path.stat().st_size))
            abandoned.update(ledger.metrics.abandoned_deliveries())
        finally:
            await ledger.close()

    asyncio.run(scenario())
    for day, counts, size in history:
        print(f"day {day + 1:2d}: {counts} file {size / 2**20:.2f} MiB")
    week = 7 * (per_day + sweeps_per_day)  # a week of predictions (and of the stuck ones')
    # Stuck outcomes kept: every one until their server has been gone a week (day 8), then
    # the last week's (abandoned, swept a week after they arrived).
    stuck = [min(day + 1, 8) for day, _, _ in history]
    for day, counts, _ in history:
        assert counts["predictions"] <= week + stuck[day] + 50 * 7, (day, counts)
        assert counts["outcomes"] <= 7 * per_day // 100 + stuck[day] + 50, (day, counts)
    last = history[-1][1]
    assert last["predictions"] >= week - per_day  # the retention's worth is kept
    assert last["deliveries"] - 7 == 2 * (last["outcomes"] - 7)  # 7 stuck ones, abandoned
    assert abandoned == {"gone": days}
    sizes = [size for _, _, size in history]
    assert sizes[-1] <= 1.25 * sizes[9], sizes  # no growth after the first week and a bit


# -- what a caller sees, from a coordinator process ------------------------------------------


@pytest.fixture
def recorder() -> Iterator[RecordingModelServer]:
    server = RecordingModelServer("m1", 0.7)
    yield server
    server.close()


def test_a_coordinator_sweeps_at_start_and_callers_see_not_found_for_swept_ids(
    tmp_path: Path,
    recorder: RecordingModelServer,
    coordinator_factory: Callable[[Path], CoordinatorProcess],
) -> None:
    """A coordinator started on an outbox holding 8-day-old rows removes them at start
    (counted in ``xylen_coordinator_outbox_pruned_total{table}``, every table exported from 0
    before); a Feedback for a removed prediction is NOT_FOUND / PREDICTION_NOT_FOUND, as for an
    id never seen, saying how long predictions are kept; a Feedback repeating an outcome within
    the retention is still acknowledged as a duplicate."""
    path = tmp_path / "feedback.sqlite3"
    now = time.time()
    old = now - WEEK - DAY
    prepared = Prepared(path)
    try:
        prepared.predictions(
            [(f"ens-old-{i}", old + i, prediction_row(old + i, ("m1",))) for i in range(50)]
        )
        prepared.outcome("ens-done", prediction_row(old, ("m1",)), old, {"m1": "delivered"})
        prepared.outcome("ens-kept", prediction_row(old, ("m1",)), now - 3600, {"m1": "delivered"})
    finally:
        prepared.close()
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint("m1", recorder.port, 1.0)],
        feedback_queue={"path": str(path)},
    )
    process = coordinator_factory(config)
    metrics_line = process.proc.stdout.readline()  # type: ignore[union-attr]
    assert metrics_line.startswith("xylen-coordinator metrics on port "), process.log()
    metrics_port = int(metrics_line.rsplit(" ", 1)[1])
    pruned = "xylen_coordinator_outbox_pruned_total"
    wait_until(
        lambda: value(scrape(metrics_port), pruned, table="predictions") == 51, "the start sweep"
    )
    outbox = with_prefix(scrape(metrics_port), "xylen_coordinator_outbox_")
    assert (
        series_value(outbox, pruned, table="outcomes") == 1
        and series_value(outbox, pruned, table="deliveries") == 1
    ), outbox
    failures = "xylen_coordinator_outbox_failures_total"
    assert series_value(outbox, failures, part="retention_sweep") == 0, outbox
    assert "outbox retention sweep: 51 predictions, 1 outcomes and 1 deliveries older than " \
        "7 days removed" in process.log()  # fmt: skip

    stub = process.stub

    def feedback(pid: str) -> Callable[[], epb.EnsembleServiceFeedbackResponse]:
        outcome = pb.TradeOutcome(realized_return=0.01, side=pb.TradeSide.TRADE_SIDE_LONG)
        outcome.close_time.FromDatetime(datetime.now(UTC))
        request = epb.EnsembleServiceFeedbackRequest(prediction_id=pid, outcome=outcome)
        return lambda: stub.Feedback(request, timeout=10)

    swept = refusal(feedback("ens-old-3"))
    unknown = refusal(feedback("ens-never-seen"))
    assert swept[0] == unknown[0] == grpc.StatusCode.NOT_FOUND
    assert swept[2] == unknown[2] == "PREDICTION_NOT_FOUND"
    assert swept[1] == (
        "no ensemble prediction 'ens-old-3' is known to this coordinator (predictions are "
        "kept for 7 days: feedback_queue.retention_seconds)"
    )
    assert refusal(feedback("ens-done"))[2] == "PREDICTION_NOT_FOUND"
    assert feedback("ens-kept")().duplicate
    assert process.stop() == 0
    assert _counts(path) == {"predictions": 1, "outcomes": 1, "deliveries": 1}


def test_a_failing_sweep_is_counted_told_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox refuses writes (SQLite's query_only, as a read-only or broken disk would):
    the start sweep fails, is counted in ``outbox_failures{part=retention_sweep}`` and logged
    once without a traceback; once writes work again the retry removes the old rows and says
    so. The retry interval is shortened from 60 s for the test."""
    monkeypatch.setattr(feedback_module, "_SWEEP_RETRY_SECONDS", 0.2)
    path = tmp_path / "feedback.sqlite3"
    old = time.time() - WEEK - DAY
    prepared = Prepared(path)
    try:
        prepared.predictions(
            [(f"ens-old-{i}", old + i, prediction_row(old + i)) for i in range(10)]
        )
    finally:
        prepared.close()

    def lines() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "xylen_coordinator.feedback" and r.levelno >= logging.INFO
        ]

    async def scenario() -> tuple[int, int, dict[str, int]]:
        ledger = Ledger(AdaptiveWeights(Adaptive()))
        await ledger.open(FeedbackQueueSettings(path=path), dict)
        outbox = ledger._outbox
        assert outbox is not None
        # Before the start sweep's first job (no await since open returned: it is queued next).
        outbox._executor.submit(outbox.db.execute, "PRAGMA query_only = ON")
        try:
            for _ in range(600):
                if ledger.metrics.outbox_failures().get("retention_sweep", 0) >= 3:
                    break
                await asyncio.sleep(0.05)
            failed = ledger.metrics.outbox_failures().get("retention_sweep", 0)
            still = (await outbox.run(outbox.row_counts))["predictions"]
            await outbox.run(outbox.db.execute, "PRAGMA query_only = OFF")
            for _ in range(600):
                if ledger.metrics.pruned_rows().get("predictions"):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
            return failed, still, ledger.metrics.pruned_rows()
        finally:
            await ledger.close()

    with caplog.at_level(logging.INFO):
        failed, still, pruned = asyncio.run(scenario())
    assert failed >= 3 and still == 10
    assert pruned.get("predictions") == 10, pruned
    told = lines()
    assert len(told) == 3, [r.getMessage() for r in told]  # failing, working again, removed
    first = told[0].getMessage()
    assert told[0].levelno == logging.WARNING and not told[0].exc_info
    assert first.startswith("retention sweep: the outbox failed (OperationalError: "), first
    assert "rows older than the retention stay until the next sweep, in 0.2s" in first
    assert told[1].getMessage().startswith("retention sweep: the outbox works again after ")
    assert (
        told[2]
        .getMessage()
        .startswith(
            "outbox retention sweep: 10 predictions, 0 outcomes and 0 deliveries older than 7 days"
        )
    )
