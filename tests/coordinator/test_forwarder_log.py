"""What the coordinator's forwarder says while a model server refuses its outcomes: one line
when deliveries to that server begin to fail and one when a delivery works again, however many
passes retried them in between; the retries go on and every outcome is delivered once the
server takes them. The other server, which works all along, is never mentioned. Real
grpc.aio model servers on loopback ports (one answering UNAVAILABLE to Feedback until told
otherwise), the real outbox file."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from coordinator.helpers import endpoint, write_config
from coordinator.recording_model_server import RecordingModelServer

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator import Coordinator

ROW = [pb.PredictInput(features=types_pb2.FeatureVector(values=[0.1, 0.2]))]
OUTCOMES = 20
PASSES = 5
"""Passes of the forwarder (each retrying every outcome for the failing server) to wait for."""


def _wait(check: Callable[[], bool], what: str) -> None:
    for _ in range(1200):  # a minute at most, then fail rather than hang
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def _about(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    """The forwarder's lines (INFO and above) that name server ``name``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "xylen_coordinator.outbox"
        and r.levelno >= logging.INFO
        and f" to {name} " in f" {r.getMessage()} "
    ]


def test_a_server_refusing_feedback_is_logged_once_per_change_not_per_delivery(
    tmp_path: Path, recorders: list[RecordingModelServer], caplog: pytest.LogCaptureFixture
) -> None:
    up, down = recorders
    down.fail_feedback = 10**9  # every Feedback answered UNAVAILABLE until told otherwise
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint(r.name, r.port, 1.0) for r in recorders],
        retraining={"enabled": True, "feedback_delay_seconds": 0},
        feedback_queue={
            "path": str(tmp_path / "feedback.sqlite3"),
            "retry_initial_seconds": 0.2,
            "retry_max_seconds": 0.2,  # every pass retries every outcome
        },
    )
    with caplog.at_level(logging.INFO), Coordinator(config) as coordinator:
        for _ in range(OUTCOMES):
            row = coordinator.predict(ROW).decision
            coordinator.feedback(row.prediction_id, realized_return=0.01)
        _wait(lambda: len(up.received()) == OUTCOMES, "the working server's deliveries")
        _wait(lambda: down.feedback_attempts >= OUTCOMES * PASSES, "passes of failed deliveries")
        failing = _about(caplog, "down")
        assert len(failing) == 1, failing[:5]
        assert failing[0].startswith("feedback: delivery to down failed (UNAVAILABLE: "), failing
        assert "its outcomes stay queued, each retried with backoff up to 0.2s" in failing[0]
        assert coordinator.pending_feedback() == OUTCOMES  # retried, none given up

        with down.lock:
            down.fail_feedback = 0  # the server takes outcomes again
        _wait(lambda: len(down.received()) == OUTCOMES, "the queued outcomes delivered")
        _wait(lambda: coordinator.pending_feedback() == 0, "nothing pending")
        lines = _about(caplog, "down")
        assert len(lines) == 2, lines[:5]
        assert lines[1].startswith("feedback: delivery to down works again after "), lines
        assert _about(caplog, "up") == []
    assert sorted(r.prediction_id for r in down.received()) == sorted(
        {r.prediction_id for r in down.received()}
    )  # each outcome once


def test_refusals_for_good_are_told_once_per_server_and_code_and_counted(
    tmp_path: Path, recorders: list[RecordingModelServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A server refusing every outcome for the same reason (INVALID_ARGUMENT, a permanent code):
    each delivery is marked failed at once, with the server's answer as its error, and counted
    by server and code, but the log says so once, with the code and the first message (it
    said so once per outcome: 20 lines); once a delivery to that server works again, one line
    more. Each outcome's own line is at DEBUG."""
    up, down = recorders
    down.fail_code = grpc.StatusCode.INVALID_ARGUMENT
    down.fail_feedback = 10**9
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint(r.name, r.port, 1.0) for r in recorders],
        retraining={"enabled": True, "feedback_delay_seconds": 0},
    )
    with (
        caplog.at_level(logging.DEBUG, "xylen_coordinator.outbox"),
        Coordinator(config) as coordinator,
    ):
        ids = []
        for _ in range(OUTCOMES):
            ids.append(coordinator.predict(ROW).decision.prediction_id)
            coordinator.feedback(ids[-1], realized_return=0.01)
        _wait(lambda: len(up.received()) == OUTCOMES, "the working server's deliveries")
        _wait(lambda: coordinator.pending_feedback() == 0, "every refusal settled")
        assert down.feedback_attempts == OUTCOMES  # none retried
        refused = _about(caplog, "down")
        assert len(refused) == 1, refused[:5]
        assert refused[0].startswith(
            "feedback refused for good: delivery to down failed (INVALID_ARGUMENT: injected "
            "failure); each outcome it refuses with INVALID_ARGUMENT is marked failed and not "
            "retried"
        ), refused
        debug = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.DEBUG and "refused for good" in r.getMessage()
        ]
        assert len(debug) == OUTCOMES, debug[:3]
        assert coordinator.aio.metrics.refusals() == {("down", "INVALID_ARGUMENT"): OUTCOMES}
        for pid in ids:
            assert coordinator.delivery_states(pid) == {
                "up": ("delivered", 1, ""),
                "down": ("failed", 1, "INVALID_ARGUMENT: injected failure"),
            }

        with down.lock:
            down.fail_feedback = 0  # the server takes outcomes again
        row = coordinator.predict(ROW).decision
        coordinator.feedback(row.prediction_id, realized_return=0.01)
        _wait(lambda: len(down.received()) == 1, "a delivery that works")
        lines = _about(caplog, "down")
        assert len(lines) == 2, lines[:5]
        assert lines[1].startswith(
            f"feedback refused for good: delivery to down works again after {OUTCOMES} failed "
            "attempts in "
        ), lines
        assert _about(caplog, "up") == []
