"""What happens to the coordinator's outbox over a fleet's life: a server removed from the
configuration, a reload changing ``feedback_queue``, a server refusing outcomes for good.

* A delivery to a server that is not an enabled endpoint waits (the server may come back with
  the next reload); once the server has been absent for longer than the retention, its pending
  deliveries are marked ``abandoned`` (a final state), counted by server, told once per server,
  and then swept with their outcomes like delivered ones. A configured server's deliveries are
  never abandoned, however long it is down.
* A reload changes the retention for the next sweep and the forwarder's backoff for its next
  delivery, without a restart (SIGHUP to a coordinator process too).
* The new counters are exported from 0.

Real SQLite files, a real coordinator (in the test process, and as a process with SIGHUP), real
recording model servers on loopback; time is controlled by rows written with past timestamps,
never by sleeping."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from coordinator.coordinator_process import CoordinatorProcess
from coordinator.helpers import endpoint, free_port, write_config
from coordinator.outbox_rows import DAY, Prepared, prediction_row, refusal, wait_until
from coordinator.recording_model_server import RecordingModelServer
from metrics_page import scrape, series_value, with_prefix

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator import Coordinator
from xylen_server.durable import sqlite_connect
from xylen_server.errors import NotFound

HOUR = 3600.0
ROW = [pb.PredictInput(features=types_pb2.FeatureVector(values=[0.1, 0.2]))]


def _abandon_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "xylen_coordinator.feedback" and "abandoned" in r.getMessage()
    ]


def _new_outcome_for_gone(coordinator: Coordinator, pid: str) -> str:
    """An outcome for ``pid`` to forward to ``gone`` only, written into the running
    coordinator's outbox behind its back, then a sweep: the state of its delivery."""
    writer = Prepared(outbox=coordinator.aio._ledger._outbox)
    try:
        writer.outcome(
            pid, prediction_row(time.time(), ("gone",)), time.time(), {"gone": "pending"}
        )
    finally:
        writer.close()
    coordinator.sweep_outbox()
    return coordinator.delivery_states(pid)["gone"][0]


def test_deliveries_to_a_server_gone_longer_than_the_retention_are_abandoned_then_swept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Retention an hour. ``gone`` was last configured 2 hours ago, ``away`` 30 minutes ago
    (what the outbox recorded while they were: the ``targets`` table survives restarts), ``m1``
    is configured but down (nothing listens on its port). The sweep abandons ``gone``'s pending
    deliveries only: a recent outcome's stays, marked ``abandoned`` with the reason, until the
    retention passes; an old outcome waiting for ``gone`` alone is removed in the same sweep.
    ``away`` and ``m1`` keep waiting. One warning for ``gone``, however many sweeps and late
    outcomes follow, until it is configured again: then its new deliveries wait again."""
    path = tmp_path / "feedback.sqlite3"
    now = time.time()
    prepared = Prepared(path)
    try:
        prepared.call(prepared.outbox.absent_targets, {"m1", "gone", "away"}, now - 2 * HOUR)
        prepared.call(prepared.outbox.absent_targets, {"m1", "away"}, now - HOUR / 2)
        everyone = ("m1", "gone", "away")
        prepared.outcome(
            "ens-old", prediction_row(now - 3 * HOUR, everyone), now - 2 * HOUR,
            dict.fromkeys(everyone, "pending"),
        )  # fmt: skip
        prepared.outcome(
            "ens-recent", prediction_row(now - 60, ("gone",)), now - 30, {"gone": "pending"}
        )
        prepared.outcome(
            "ens-gone-only",
            prediction_row(now - 3 * HOUR, ("gone",)),
            now - 2 * HOUR,
            {"gone": "pending"},
        )
    finally:
        prepared.close()
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint("m1", free_port(), 1.0)],
        feedback_queue={"path": str(path), "retention_seconds": HOUR, "retry_initial_seconds": 0.2},
    )
    with caplog.at_level(logging.INFO), Coordinator(config) as coordinator:
        coordinator.sweep_outbox()  # the start sweep may have done it already: the same result
        metrics = coordinator.aio.metrics
        assert metrics.abandoned_deliveries() == {"gone": 3}
        assert metrics.pruned_rows().get("outcomes") == 1  # ens-gone-only, with its delivery
        assert coordinator.delivery_states("ens-gone-only") == {}
        old = coordinator.delivery_states("ens-old")
        assert {name: state for name, (state, _, _) in old.items()} == {
            "m1": "pending",  # down, configured: retried for as long as it takes
            "gone": "abandoned",
            "away": "pending",  # absent for half the retention: it may come back
        }
        wait_until(lambda: coordinator.delivery_states("ens-old")["m1"][1] > 0, "m1 retried")
        state, _, error = coordinator.delivery_states("ens-recent")["gone"]
        assert state == "abandoned"
        assert error.startswith("abandoned: gone not configured since "), error
        assert error.endswith(", longer than the retention (1 hour)"), error
        assert coordinator.pending_feedback() == 1  # ens-old, for m1 and away

        # A late outcome for gone: abandoned at the next sweep, counted, no second line.
        assert _new_outcome_for_gone(coordinator, "ens-late") == "abandoned"
        assert metrics.abandoned_deliveries() == {"gone": 4}
        told = _abandon_lines(caplog)
        assert len(told) == 1, [r.getMessage() for r in told]
        assert told[0].levelno == logging.WARNING
        assert (
            told[0]
            .getMessage()
            .startswith(
                "feedback: 3 outcomes waiting for gone abandoned: it has not been an enabled "
                "endpoint since "
            )
        ), told[0].getMessage()
        assert "longer than feedback_queue.retention_seconds (1 hour)" in told[0].getMessage()
        waiting = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith("feedback: delivery to away failed")
        ]
        assert waiting == [
            "feedback: delivery to away failed (endpoint not configured); its outcomes wait for "
            "it to be configured again, and are abandoned once it has been absent for longer "
            "than feedback_queue.retention_seconds; one line more when it works again"
        ]

        # gone configured again: its new deliveries wait, none abandoned.
        write_config(
            config,
            [endpoint("m1", free_port(), 1.0), endpoint("gone", free_port(), 1.0)],
            feedback_queue={"path": str(path), "retention_seconds": HOUR},
        )
        coordinator.reload()
        assert _new_outcome_for_gone(coordinator, "ens-back") == "pending"
        assert metrics.abandoned_deliveries() == {"gone": 4}


def test_a_delivery_abandoned_while_it_was_tried_stays_abandoned_unless_delivered(
    tmp_path: Path,
) -> None:
    """The forwarder read two deliveries to ``gone`` (due), then the sweep abandoned them, then
    the forwarder settled them: the failed attempt leaves its delivery abandoned (it made it
    pending again, to be abandoned and counted a second time), the one that got through is
    delivered."""
    prepared = Prepared(tmp_path / "feedback.sqlite3")
    try:
        for pid in ("ens-a", "ens-b"):
            prepared.outcome(pid, prediction_row(0.0, ("gone",)), time.time(), {"gone": "pending"})
        read = prepared.call(prepared.outbox.due, time.time(), 10)
        assert prepared.call(prepared.outbox.abandon, "gone", "abandoned: test") == 2
        failed, delivered = sorted(read, key=lambda d: d.prediction_id)
        prepared.call(
            prepared.outbox.settle,
            [(failed, "pending", time.time() + 1, "endpoint not configured"),
             (delivered, "delivered", None, "")],
        )  # fmt: skip
        states = [
            prepared.call(prepared.outbox.delivery_states, pid)["gone"][0]
            for pid in ("ens-a", "ens-b")
        ]
        assert states == ["abandoned", "delivered"]
        assert prepared.call(prepared.outbox.pending_count) == 0
    finally:
        prepared.close()


def test_a_reload_changes_the_retention_and_the_backoff_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A prediction made 2 days ago survives sweeps under the 7-day retention; after the
    config file says 1 day and the coordinator reloads it, the next sweep removes it and a
    Feedback for it is NOT_FOUND naming the new retention. A server refusing outcomes
    (UNAVAILABLE) is retried every 0.2 s; after a reload to a 1-hour backoff, its delivery's
    next attempt is an hour away. Each change is logged."""
    path = tmp_path / "feedback.sqlite3"
    prepared = Prepared(path)
    try:
        created = time.time() - 2 * DAY
        prepared.predictions([("ens-2d", created, prediction_row(created, ("m1",)))])
    finally:
        prepared.close()
    server = RecordingModelServer("m1", 0.7, fail_feedback=10**9)
    fast = {"path": str(path), "retry_initial_seconds": 0.2, "retry_max_seconds": 0.2}
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint("m1", server.port, 1.0)],
        retraining={"enabled": True, "feedback_delay_seconds": 0},
        feedback_queue=fast,
    )
    try:
        with caplog.at_level(logging.INFO), Coordinator(config) as coordinator:
            pid = coordinator.predict(ROW).decision.prediction_id
            coordinator.feedback(pid, realized_return=0.01)
            wait_until(lambda: server.feedback_attempts >= 3, "retries every 0.2 s")
            assert coordinator.sweep_outbox()["predictions"] == 0

            write_config(
                config,
                [endpoint("m1", server.port, 1.0)],
                retraining={"enabled": True, "feedback_delay_seconds": 0},
                feedback_queue={
                    **fast,
                    "retention_seconds": DAY,
                    "retry_initial_seconds": HOUR,
                    "retry_max_seconds": HOUR,
                },
            )
            coordinator.reload()
            assert coordinator.sweep_outbox()["predictions"] == 1
            with pytest.raises(NotFound) as gone:
                coordinator.feedback("ens-2d", realized_return=0.01)
            assert "predictions are kept for 1 day" in str(gone.value)

            def next_attempt() -> float:  # read beside the coordinator, as an operator would
                reader = sqlite_connect(path, read_only=True)
                try:
                    (due,) = reader.execute(
                        "SELECT due FROM deliveries WHERE prediction_id = ?", (pid,)
                    ).fetchone()
                    return float(due)
                finally:
                    reader.close()

            wait_until(lambda: next_attempt() > time.time() + HOUR / 2, "a retry an hour away")
            assert coordinator.pending_feedback() == 1  # still queued, nothing lost
    finally:
        server.close()
    changes = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("feedback_queue.")
    ]
    assert changes == [
        "feedback_queue.retention_seconds: 604800 -> 86400, in force now",
        "feedback_queue.retry_initial_seconds: 0.2 -> 3600, in force now",
        "feedback_queue.retry_max_seconds: 0.2 -> 3600, in force now",
    ]


def test_a_coordinator_exports_the_new_counters_from_0_and_sighup_changes_the_retention(
    tmp_path: Path,
    coordinator_factory: Callable[[Path], CoordinatorProcess],
) -> None:
    """A coordinator process: ``xylen_coordinator_feedback_refused_total{endpoint,code}`` and
    ``..._feedback_abandoned_total{endpoint}`` are exported from 0 for the configured endpoint;
    a server refusing an outcome (PERMISSION_DENIED) counts it, logged once. SIGHUP after the
    file's retention changed: a Feedback for an unknown id names the new retention."""
    server = RecordingModelServer("m1", 0.7, fail_feedback=10**9)
    server.fail_code = grpc.StatusCode.PERMISSION_DENIED
    path = tmp_path / "feedback.sqlite3"
    sections = {
        "retraining": {"enabled": True, "feedback_delay_seconds": 0},
        "feedback_queue": {"path": str(path)},
    }
    config = write_config(tmp_path / "config.yaml", [endpoint("m1", server.port, 1.0)], **sections)
    try:
        process = coordinator_factory(config)
        line = process.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("xylen-coordinator metrics on port "), process.log()
        port = int(line.rsplit(" ", 1)[1])
        refused = "xylen_coordinator_feedback_refused_total"
        abandoned = "xylen_coordinator_feedback_abandoned_total"
        denied = {"code": "PERMISSION_DENIED", "endpoint": "m1"}
        scraped = with_prefix(scrape(port), "xylen_coordinator_feedback_")
        assert (
            series_value(scraped, refused, **denied) == 0
            and series_value(scraped, abandoned, endpoint="m1") == 0
        ), scraped
        for code in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE"):
            assert series_value(scraped, refused, code=code, endpoint="m1") == 0, scraped

        stub = process.stub
        answer = stub.Predict(epb.EnsembleServicePredictRequest(inputs=ROW), timeout=10)
        outcome = pb.TradeOutcome(realized_return=0.01, side=pb.TradeSide.TRADE_SIDE_LONG)
        outcome.close_time.GetCurrentTime()
        for row in answer.predictions:
            request = epb.EnsembleServiceFeedbackRequest(
                prediction_id=row.prediction_id, outcome=outcome
            )
            stub.Feedback(request, timeout=10)
        wait_until(lambda: series_value(scrape(port), refused, **denied) == 1, "the refusal")

        def unknown() -> str:
            request = epb.EnsembleServiceFeedbackRequest(prediction_id="ens-never", outcome=outcome)
            return refusal(lambda: stub.Feedback(request, timeout=10))[1]

        assert "predictions are kept for 7 days" in unknown()
        sections["feedback_queue"]["retention_seconds"] = 2 * DAY
        write_config(config, [endpoint("m1", server.port, 1.0)], **sections)
        process.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "predictions are kept for 2 days" in unknown(), "the reloaded retention")
        assert process.stop() == 0
    finally:
        server.close()
    log = process.log()
    assert log.count("refused for good") == 1, log
    assert "feedback_queue.retention_seconds: 604800 -> 172800, in force now" in log
