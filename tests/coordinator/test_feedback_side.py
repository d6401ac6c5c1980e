"""An outcome must say which way the price went: after a HOLD (no trade followed the ensemble)
an outcome with neither side nor the underlying's return is refused, one with the return is
forwarded as sent, and a short's profit is forwarded as a short."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from coordinator.helpers import endpoint, write_config
from coordinator.recording_model_server import RecordingModelServer

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator import Coordinator
from xylen_server.errors import InvalidArgument

ROW = [pb.PredictInput(features=types_pb2.FeatureVector(values=[0.1, 0.2]))]


@pytest.fixture
def undecided() -> Iterator[list[RecordingModelServer]]:
    servers = [RecordingModelServer("a", 0.5), RecordingModelServer("b", 0.5)]
    yield servers
    for server in servers:
        server.close()


def test_after_a_hold_the_underlying_move_is_required(
    tmp_path: Path, undecided: list[RecordingModelServer]
) -> None:
    endpoints = [endpoint(f.name, f.port, 1.0) for f in undecided]
    config = write_config(
        tmp_path / "config.yaml",
        endpoints,
        retraining={"enabled": True, "feedback_delay_seconds": 0.0},
    )
    with Coordinator(config) as coordinator:
        held = coordinator.predict(ROW).decision
        assert held.signal == "HOLD"
        with pytest.raises(InvalidArgument) as refused:
            coordinator.feedback(held.prediction_id, realized_return=0.01)
        assert refused.value.reason == "MISSING_UNDERLYING_MOVE"
        short = coordinator.predict(ROW).decision
        exact = coordinator.feedback(
            held.prediction_id, realized_return=0.0, underlying_log_return=-0.02
        )
        sided = coordinator.feedback(
            short.prediction_id, realized_return=0.03, side=pb.TradeSide.TRADE_SIDE_SHORT
        )
        assert not exact.duplicate and not sided.duplicate
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(len(f.feedback) == 2 for f in undecided):
            time.sleep(0.05)
    for recorder in undecided:
        outcomes = {
            request.outcome.realized_return: request.outcome for _, request in recorder.feedback
        }
        assert outcomes[0.0].underlying_log_return == -0.02 and outcomes[0.0].side == 0
        assert outcomes[0.03].side == pb.TradeSide.TRADE_SIDE_SHORT
        assert not outcomes[0.03].HasField("underlying_log_return")


def test_an_outcome_queued_without_a_side_is_forwarded_with_the_decisions_side(
    tmp_path: Path,
) -> None:
    """An outbox written by a coordinator from before TradeOutcome.side: its queued outcome
    is delivered with the side of the trade that followed the decision (BUY: long)."""
    recorders = [RecordingModelServer("up", 0.9), RecordingModelServer("down", 0.3)]
    try:
        endpoints = [endpoint(f.name, f.port, 1.0) for f in recorders]
        config = write_config(
            tmp_path / "config.yaml",
            endpoints,
            retraining={"enabled": True, "feedback_delay_seconds": 2.0},
        )
        with Coordinator(config) as first:
            bought = first.predict(ROW).decision
            assert bought.signal == "BUY"
            first.feedback(bought.prediction_id, realized_return=0.01)
        # what an older coordinator queued: the outcome as the caller sent it, no side
        db = sqlite3.connect(next(tmp_path.rglob("feedback.sqlite3")))
        [(blob,)] = db.execute("SELECT outcome FROM outcomes").fetchall()
        old = pb.TradeOutcome.FromString(blob)
        old.ClearField("side")
        with db:
            db.execute("UPDATE outcomes SET outcome = ?", (old.SerializeToString(),))
        db.close()
        with Coordinator(config):
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not all(f.feedback for f in recorders):
                time.sleep(0.05)
        for recorder in recorders:
            [(_, request)] = recorder.feedback
            assert request.outcome.side == pb.TradeSide.TRADE_SIDE_LONG
            assert request.outcome.realized_return == 0.01
    finally:
        for server in recorders:
            server.close()
