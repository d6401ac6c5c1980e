"""The limits every request field is held to, checked before any work is done for it.

Sizes over a limit are RESOURCE_EXHAUSTED, text over a limit INVALID_ARGUMENT; every message
names the setting that holds the limit and never quotes more than a short prefix of the
caller's text. What is checked here is what costs memory or time before the domain's own
validation would refuse it (rows, candles per window, string lengths); the domain checks
values (features, candles, outcomes) where it uses them.

==========================  ===========================  =====================================
field                       limit (setting)              refusal (reason)
==========================  ===========================  =====================================
``model_name``              ``MAX_NAME_BYTES``           INVALID_ARGUMENT NAME_TOO_LONG
``WatchRetrain.job_id``     ``MAX_NAME_BYTES``           INVALID_ARGUMENT NAME_TOO_LONG
``PredictRequest.inputs``   ``MAX_BATCH_ROWS``           RESOURCE_EXHAUSTED BATCH_TOO_LARGE
``CandleWindow.candles``    ``MAX_WINDOW_CANDLES``       RESOURCE_EXHAUSTED WINDOW_TOO_LONG
stream ``request_id``       ``MAX_REQUEST_ID_BYTES``     INVALID_ARGUMENT REQUEST_ID_TOO_LONG
stream ``timeout``          a valid Duration, >= 0       INVALID_ARGUMENT INVALID_TIMEOUT
``Feedback.prediction_id``  ``FEEDBACK_MAX_ID_BYTES``    INVALID_ARGUMENT PREDICTION_ID_TOO_LONG
a whole message             ``MAX_MESSAGE_BYTES``        RESOURCE_EXHAUSTED (grpc itself)
admitted unary requests     ``MAX_INFLIGHT_BYTES``       RESOURCE_EXHAUSTED BYTES_IN_FLIGHT
==========================  ===========================  =====================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import duration_pb2

from xylen.v1 import model_service_pb2 as pb
from xylen_server.errors import InvalidArgument, ResourceExhausted
from xylen_server.outcomes import check_prediction_id
from xylen_server.settings import Settings

#: google.protobuf.Duration's documented range: +-10,000 years.
MAX_DURATION_SECONDS = 315_576_000_000


def check_text(value: str, limit: int, field: str, setting: str, reason: str) -> None:
    """``value`` fits ``limit`` UTF-8 bytes, or INVALID_ARGUMENT ``reason``."""
    if len(value) * 4 <= limit:  # UTF-8 is at most 4 bytes a character: no encoding needed
        return
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidArgument(
            f"{field} is {size} bytes, longer than {setting} ({limit})",
            reason=reason,
            field=field,
            limit=limit,
            size=size,
        )


def check_name(value: str, settings: Settings, field: str = "model_name") -> None:
    check_text(value, settings.max_name_bytes, field, "MAX_NAME_BYTES", "NAME_TOO_LONG")


def check_predict(request: pb.PredictRequest, settings: Settings) -> None:
    """Rows, candles per window and the model name of one Predict request."""
    name = request.model_name
    if len(name) * 4 > settings.max_name_bytes:  # check_text's own first test, without a call
        check_name(name, settings)
    inputs = request.inputs
    rows = len(inputs)
    if rows > settings.max_batch_rows:
        raise ResourceExhausted(
            f"the request has {rows} rows, more than MAX_BATCH_ROWS ({settings.max_batch_rows})",
            reason="BATCH_TOO_LARGE",
            rows=rows,
            limit=settings.max_batch_rows,
        )
    if rows == 1 and not inputs[0].HasField("candles"):  # the common case, without a loop
        return
    limit = settings.max_window_candles
    for index, item in enumerate(inputs):
        if item.WhichOneof("input") == "candles":
            candles = len(item.candles.candles)
            if candles > limit:
                raise ResourceExhausted(
                    f"row {index} has a window of {candles} candles, more than "
                    f"MAX_WINDOW_CANDLES ({limit})",
                    reason="WINDOW_TOO_LONG",
                    row=index,
                    limit=limit,
                    got=candles,
                )


def check_request_id(request_id: str, settings: Settings) -> None:
    check_text(
        request_id,
        settings.max_request_id_bytes,
        "request_id",
        "MAX_REQUEST_ID_BYTES",
        "REQUEST_ID_TOO_LONG",
    )


def timeout_seconds(item: pb.PredictStreamRequest) -> float:
    """An item's ``timeout`` in seconds (0: none), or INVALID_ARGUMENT for a Duration out of its
    range, with mixed signs or nanos out of range, or negative."""
    if not item.HasField("timeout"):
        return 0.0
    duration: duration_pb2.Duration = item.timeout
    seconds, nanos = duration.seconds, duration.nanos
    if (
        not -MAX_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS
        or not -999_999_999 <= nanos <= 999_999_999
        or (seconds > 0 > nanos)
        or (seconds < 0 < nanos)
    ):
        raise InvalidArgument(
            "timeout is not a valid google.protobuf.Duration", reason="INVALID_TIMEOUT"
        )
    if seconds < 0 or nanos < 0:
        raise InvalidArgument("timeout must not be negative", reason="INVALID_TIMEOUT")
    return seconds + nanos / 1e9


PREDICT_METHOD = "/xylen.v1.ModelService/Predict"


def checker(method: str) -> Callable[[Any, Settings], None]:
    """:func:`check_request` as ``method``'s requests need it: Predict's own check, without
    asking each request its type."""
    return check_predict if method == PREDICT_METHOD else check_request


def check_request(request: Any, settings: Settings) -> None:
    """The limits of one unary request (see the table in the module docstring)."""
    if isinstance(request, pb.PredictRequest):
        check_predict(request, settings)
    elif isinstance(request, pb.GetModelInfoRequest | pb.ListModelVersionsRequest):
        check_name(request.model_name, settings)
    elif isinstance(request, pb.WatchRetrainRequest):
        check_name(request.job_id, settings, "job_id")
    elif isinstance(request, pb.FeedbackRequest):
        # Before the id is looked up (in memory, the store, the log on disk, and, with workers,
        # sent to every other worker): refused later, a 16 MB id had gone all that way.
        check_prediction_id(request.prediction_id, settings.feedback_max_id_bytes)
