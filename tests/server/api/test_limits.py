"""The admission limits (``xylen_server.api.limits``) as the interceptors apply them to each
unary request before any work: the table in the module's docstring, row by row where a row is
not already shown over gRPC elsewhere."""

from __future__ import annotations

import pytest

from xylen.v1 import model_service_pb2 as pb
from xylen_server.api.limits import check_request
from xylen_server.errors import InvalidArgument
from xylen_server.settings import Settings


def test_a_feedback_prediction_id_is_held_to_its_limit_before_it_is_looked_up() -> None:
    settings = Settings(feedback_max_id_bytes=16)
    check_request(pb.FeedbackRequest(prediction_id="p" * 16), settings)
    with pytest.raises(InvalidArgument) as long:
        check_request(pb.FeedbackRequest(prediction_id="p" * 17), settings)
    assert long.value.reason == "PREDICTION_ID_TOO_LONG"
    assert "FEEDBACK_MAX_ID_BYTES (16)" in long.value.message
    with pytest.raises(InvalidArgument) as missing:
        check_request(pb.FeedbackRequest(), settings)
    assert missing.value.reason == "MISSING_PREDICTION_ID"
