"""Feedback while its store cannot be opened: bad input still gets INVALID_ARGUMENT naming the
problem (validation comes first), only a well-formed outcome gets UNAVAILABLE, and an id whose
storage cannot be checked is UNAVAILABLE, not NOT_FOUND.

A real server, its store held by a real flock as another server of the model would hold it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from errorinfo import error_info
from harness import InProcessServer, write_model
from learning_helpers import feedback, learning_settings

from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.learning.feedback_store import FeedbackStore


def test_bad_feedback_is_invalid_argument_while_the_store_is_down(tmp_path, candles, feature_rows):
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=10)
    settings = learning_settings(tmp_path)
    other = FeedbackStore(settings.learning_dir)  # holds the store's lock
    server = InProcessServer(settings)
    row = feature_rows[0]
    bad = {
        "PREDICTION_ID_TOO_LONG": feedback("x" * 129, 0.01, row),
        "MISSING_PREDICTION_ID": feedback("", 0.01, row),
        "INVALID_OUTCOME": feedback("nan-1", float("nan"), row),
        "OUTCOME_IN_FUTURE": feedback("f-1", 0.01, row, datetime.now(UTC) + timedelta(days=2)),
        "FEATURE_OUT_OF_RANGE": feedback("big-1", 0.01, [1e300, *row[1:]]),
        "FEATURE_COUNT_MISMATCH": feedback("short-1", 0.01, row[:3]),
    }
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            for reason, request in bad.items():
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Feedback(request)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, reason
                assert error_info(refused.value).reason == reason
            # Well-formed, or not known to be bad without the store: UNAVAILABLE, retry later.
            for request in (feedback("good-1", 0.01, row), feedback("never-predicted", 0.01)):
                with pytest.raises(grpc.RpcError) as down:
                    stub.Feedback(request)
                assert down.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_info(down.value).reason == "FEEDBACK_STORE_UNAVAILABLE"
            other.close()
            assert not stub.Feedback(feedback("good-1", 0.01, row)).duplicate
    finally:
        other.close()
        server.close()
