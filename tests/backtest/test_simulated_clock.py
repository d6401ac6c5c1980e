"""A replay's simulated clock (CLOCK_FILE) on a real server process: Feedback before its
horizon has passed is refused as in the future, the same Feedback once the clock reaches its
close time is stored, and an outcome closed before the (simulated) prediction time is refused.
A clock file that cannot be read stops the server at start."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import harness
import numpy as np
import pytest
from errorinfo import error_info

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server import clock
from xylen_server.auth import bearer_metadata
from xylen_server.candles import window_input

HOUR_MS = 3_600_000
TOKEN = "replay-clock-test-token"


def outcome(close_ms: int, move: float) -> pb.TradeOutcome:
    out = pb.TradeOutcome(underlying_log_return=move)
    out.close_time.FromMilliseconds(close_ms)
    return out


def test_feedback_before_its_horizon_is_refused_under_the_simulated_clock(
    tmp_path: Path, fleet_models: Path, fleet_candles: dict[str, np.ndarray]
) -> None:
    candles = fleet_candles
    bar = 300
    decision_ms = int(candles["open_time"][bar]) + HOUR_MS - 1  # the bar's close
    clock_file = tmp_path / "clock"
    clock.write(clock_file, decision_ms)
    (tmp_path / "token").write_text(TOKEN)
    server = harness.start_server(
        fleet_models,
        "model_1",
        env={
            "CLOCK_FILE": str(clock_file),
            "ADMIN_TOKEN_FILE": str(tmp_path / "token"),
            "FEEDBACK_DATA_DIR": str(tmp_path / "data"),
            "RETRAIN_AUTO": "false",
        },
    )
    try:
        with server.channel() as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            answer = stub.Predict(
                pb.PredictRequest(inputs=[window_input(candles, bar, 100)]), timeout=30
            )
            prediction_id = answer.predictions[0].prediction_id
            horizon_ms = decision_ms + HOUR_MS  # the next bar's close
            move = float(np.log(candles["close"][bar + 1] / candles["close"][bar]))
            request = pb.FeedbackRequest(
                prediction_id=prediction_id, outcome=outcome(horizon_ms, move)
            )
            # The wall clock is far past 2024, but the simulated now is the decision bar's close.
            with pytest.raises(grpc.RpcError) as refused:
                stub.Feedback(request, metadata=bearer_metadata(TOKEN), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(refused.value).reason == "OUTCOME_IN_FUTURE"
            assert "in the future" in (refused.value.details() or "")
            # Closed before the prediction was made (simulated time): refused too.
            early = pb.FeedbackRequest(
                prediction_id=prediction_id, outcome=outcome(decision_ms - 2 * HOUR_MS, move)
            )
            with pytest.raises(grpc.RpcError) as before:
                stub.Feedback(early, metadata=bearer_metadata(TOKEN), timeout=30)
            assert before.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "before the prediction was made" in (before.value.details() or "")
            # The horizon passes: the same outcome is stored.
            clock.write(clock_file, horizon_ms)
            stored = stub.Feedback(request, metadata=bearer_metadata(TOKEN), timeout=30)
            assert not stored.duplicate
    finally:
        assert server.stop(signal.SIGTERM) == 0


def test_an_unreadable_clock_file_stops_the_server_at_start(
    tmp_path: Path, fleet_models: Path
) -> None:
    env = {
        "MODEL_PATH": str(fleet_models),
        "MODEL_NAME": "model_1",
        "GRPC_PORT": "0",
        "METRICS_PORT": "0",
        "CLOCK_FILE": str(tmp_path / "absent"),
        "FEEDBACK_DATA_DIR": str(tmp_path / "data"),
        "PATH": "/usr/bin:/bin",
    }
    done = harness.server_run(env)
    assert done.returncode == 2
    assert "CLOCK_FILE" in done.stderr and str(tmp_path / "absent") in done.stderr


def test_the_clock_module_reads_the_file_and_defaults_to_the_wall_clock(tmp_path: Path) -> None:
    import time

    path = tmp_path / "clock"
    clock.write(path, 1_700_000_000_123)
    try:
        clock.use_file(path)
        assert clock.simulated() and clock.now_ms() == 1_700_000_000_123
        clock.write(path, 1_700_000_003_600)
        assert clock.now_seconds() == 1_700_000_003.6
        path.write_text("garbage")  # a moment's bad content keeps the last value
        assert clock.now_ms() == 1_700_000_003_600
    finally:
        clock.use_file(None)
    assert not clock.simulated()
    assert abs(clock.now_ms() - time.time() * 1000) < 60_000
    with pytest.raises(clock.ClockError, match="epoch milliseconds"):
        clock.use_file(path)
