"""Feedback: durable, delayed, retried, idempotent, surviving a coordinator restart; adaptive
weights from matured outcomes. Model servers here are small recording ModelServices."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from coordinator.helpers import endpoint, write_config
from coordinator.recording_model_server import RecordingModelServer

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator import Coordinator
from xylen_server.errors import FailedPrecondition, InvalidArgument, NotFound

ROW = [pb.PredictInput(features=types_pb2.FeatureVector(values=[0.1, 0.2]))]


def config_for(tmp_path: Path, recorders: list[RecordingModelServer], **sections: object) -> Path:
    endpoints = [endpoint(f.name, f.port, 1.0) for f in recorders]
    return write_config(tmp_path / "config.yaml", endpoints, **sections)


def wait_for(condition: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_forwarded_after_the_delay_once_with_each_servers_id(
    tmp_path: Path, recorders: list[RecordingModelServer]
) -> None:
    config = config_for(
        tmp_path, recorders, retraining={"enabled": True, "feedback_delay_seconds": 1.0}
    )
    with Coordinator(config) as coordinator:
        result = coordinator.predict(ROW)
        row = result.decision
        ack = coordinator.feedback(row.prediction_id, pnl=12.5, realized_return=0.01)
        acked = time.monotonic()
        assert not ack.duplicate and set(ack.forward_to) == {"up", "down"}
        assert [f.received() for f in recorders] == [[], []]  # not before the delay
        wait_for(lambda: all(f.received() for f in recorders))
        again = coordinator.feedback(row.prediction_id, pnl=12.5, realized_return=0.01)
        assert again.duplicate
        time.sleep(0.5)
        assert coordinator.pending_feedback() == 0
    votes = {v.server_name: v.model_prediction_id for v in row.votes}
    for recorder in recorders:
        [(when, request)] = recorder.feedback
        assert when - acked >= 1.0 - 0.05
        assert request.prediction_id == votes[recorder.name]
        assert request.outcome.pnl == 12.5 and request.outcome.realized_return == 0.01
        # no side sent: the trade followed the ensemble's BUY, so it is forwarded as a long
        assert row.signal == "BUY" and request.outcome.side == pb.TradeSide.TRADE_SIDE_LONG


def test_survives_a_coordinator_restart(
    tmp_path: Path, recorders: list[RecordingModelServer]
) -> None:
    config = config_for(tmp_path, recorders, retraining={"feedback_delay_seconds": 1.5})
    with Coordinator(config) as first:
        fed, unfed = first.predict(ROW), first.predict(ROW)
        first.feedback(fed.decision.prediction_id, realized_return=-0.02)
    assert [f.received() for f in recorders] == [[], []]  # stopped before the delay ran out
    with Coordinator(config) as second:
        wait_for(lambda: all(f.received() for f in recorders))
        # the prediction log survived too: both ids are known to the new process
        assert second.feedback(fed.decision.prediction_id, realized_return=-0.02).duplicate
        assert not second.feedback(unfed.decision.prediction_id, realized_return=0.01).duplicate
    for recorder in recorders:
        assert len(recorder.received()) == 1  # exactly once


def test_failed_deliveries_are_retried_until_they_succeed(
    tmp_path: Path, recorders: list[RecordingModelServer]
) -> None:
    recorders[0].fail_feedback = 2
    config = config_for(tmp_path, recorders, retraining={"feedback_delay_seconds": 0})
    with Coordinator(config) as coordinator:
        row = coordinator.predict(ROW).decision
        coordinator.feedback(row.prediction_id, realized_return=0.01)
        wait_for(lambda: all(f.received() for f in recorders))
        states = coordinator._call(coordinator.aio.delivery_states(row.prediction_id))
    assert recorders[0].feedback_attempts == 3 and len(recorders[0].received()) == 1
    assert states["up"][:2] == ("delivered", 3)
    assert states["down"][:2] == ("delivered", 1)


def test_feedback_errors(tmp_path: Path, recorders: list[RecordingModelServer]) -> None:
    config = config_for(tmp_path, recorders)
    with Coordinator(config) as coordinator:
        with pytest.raises(NotFound) as missing:
            coordinator.feedback("ens-nope-1", realized_return=0.01)
        assert missing.value.reason == "PREDICTION_NOT_FOUND"
        row = coordinator.predict(ROW).decision
        with pytest.raises(InvalidArgument) as bad:
            coordinator.feedback(row.prediction_id, realized_return=float("nan"))
        assert bad.value.reason == "INVALID_OUTCOME"
        outcome = pb.TradeOutcome(realized_return=0.01)
        outcome.close_time.FromSeconds(int(time.time()) + 3600)
        with pytest.raises(InvalidArgument) as future:
            coordinator.feedback(row.prediction_id, outcome)
        assert future.value.reason == "OUTCOME_IN_FUTURE"
    disabled = config_for(tmp_path, recorders, retraining={"enabled": False})
    with Coordinator(disabled) as coordinator:
        row = coordinator.predict(ROW).decision
        with pytest.raises(FailedPrecondition) as off:
            coordinator.feedback(row.prediction_id, realized_return=0.01)
        assert off.value.reason == "FEEDBACK_DISABLED"


def test_no_forwarding_when_switched_off(
    tmp_path: Path, recorders: list[RecordingModelServer]
) -> None:
    config = config_for(
        tmp_path,
        recorders,
        retraining={"send_feedback_to_models": False, "feedback_delay_seconds": 0},
    )
    with Coordinator(config) as coordinator:
        row = coordinator.predict(ROW).decision
        assert coordinator.feedback(row.prediction_id, realized_return=0.01).forward_to == ()
        time.sleep(0.5)
    assert [f.received() for f in recorders] == [[], []]


def test_adaptive_weights_follow_matured_outcomes(
    tmp_path: Path, recorders: list[RecordingModelServer]
) -> None:
    weights = {
        "mode": "adaptive",
        "adaptive": {"metric": "brier", "half_life_outcomes": 20, "min_outcomes": 3},
    }
    config = config_for(
        tmp_path, recorders, weights=weights, retraining={"feedback_delay_seconds": 60}
    )
    with Coordinator(config) as coordinator:
        first = coordinator.predict(ROW).decision  # 0.5*0.9 + 0.5*0.3 = 0.6: BUY
        assert first.probability == pytest.approx(0.6)
        assert all(v.adaptive is not None and v.adaptive.multiplier == 1.0 for v in first.votes)
        for _ in range(5):  # BUY trades that made money: the price went up
            row = coordinator.predict(ROW).decision
            coordinator.feedback(row.prediction_id, realized_return=0.01)
        later = coordinator.predict(ROW).decision
        by_name = {v.server_name: v for v in later.votes}
        up, down = by_name["up"], by_name["down"]
        assert up.adaptive is not None and down.adaptive is not None
        assert up.adaptive.brier_score == pytest.approx(0.01)  # (0.9 - 1)^2
        assert down.adaptive.brier_score == pytest.approx(0.49)  # (0.3 - 1)^2
        assert up.adaptive.multiplier == pytest.approx(2.0)  # 0.25/0.01 capped at 2
        assert down.adaptive.multiplier == pytest.approx(0.25 / 0.49)
        assert up.normalized_weight > 0.75
        expected = (2.0 * 0.9 + 0.25 / 0.49 * 0.3) / (2.0 + 0.25 / 0.49)
        assert later.probability == pytest.approx(expected)
    # rebuilt from the durable outcomes after a restart
    with Coordinator(config) as again:
        rebuilt = {v.server_name: v for v in again.predict(ROW).decision.votes}
        assert rebuilt["up"].adaptive.multiplier == pytest.approx(2.0)  # type: ignore[union-attr]
