"""Whether a server's answer can be counted as a vote (pure: no gRPC calls, no I/O).

A server that answers a probability that is not finite or outside [0, 1], names another model
than the one its endpoint serves, a model version the coordinator was not told about, or a
prediction id too long to keep, is
not counted: its vote is missing with reason REJECTED and one of the reasons below, so one
lying server never fails an ensemble call nor moves its decision. (The fan-out first checks a
version not known yet with the server's GetModelInfo during the call, see
:meth:`~xylen_coordinator.endpoints.EndpointClient.confirm_version`: a hot swap drops no vote.)
"""

from __future__ import annotations

import math
from collections.abc import Set
from dataclasses import dataclass

from xylen.v1 import model_service_pb2 as pb

#: Versions above this are absurd whatever the server says in GetModelInfo.
MAX_MODEL_VERSION = 2**31 - 1
#: Longest prediction id a server may give (UTF-8 bytes): it is kept in the outbox for good.
MAX_PREDICTION_ID_BYTES = 256
#: Longest piece of a server-chosen string quoted in a message.
_QUOTE = 64


@dataclass(frozen=True)
class Rejection:
    """Why an answer is not counted: ``reason`` is stable (UPPER_SNAKE), ``message`` bounded."""

    reason: str
    message: str


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE else text[:_QUOTE] + "...")


def check_answer(
    response: pb.PredictResponse, model_name: str, known_versions: Set[int]
) -> Rejection | None:
    """The first thing wrong with ``response``, or None when every row can be counted.

    ``model_name`` is the model the endpoint must serve (empty: not checked);
    ``known_versions`` the versions the server reported in GetModelInfo (empty: any version in
    1..MAX_MODEL_VERSION)."""
    for row, prediction in enumerate(response.predictions):
        p = prediction.probability_up
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            return Rejection(
                "PROBABILITY_OUT_OF_RANGE",
                f"row {row}: probability_up {p!r} is not a number in [0, 1]",
            )
        if model_name and prediction.model_name != model_name:
            return Rejection(
                "WRONG_MODEL_NAME",
                f"row {row}: model {_quote(prediction.model_name)}, expected {_quote(model_name)}",
            )
        size = len(prediction.prediction_id.encode())
        if size > MAX_PREDICTION_ID_BYTES:
            return Rejection(
                "PREDICTION_ID_TOO_LONG",
                f"row {row}: prediction_id is {size} bytes, more than {MAX_PREDICTION_ID_BYTES}",
            )
        version = prediction.model_version
        if not 1 <= version <= MAX_MODEL_VERSION:
            return Rejection(
                "UNKNOWN_MODEL_VERSION", f"row {row}: model version {version} is absurd"
            )
        if known_versions and version not in known_versions:
            told = ", ".join(str(v) for v in sorted(known_versions)[-5:])
            return Rejection(
                "UNKNOWN_MODEL_VERSION",
                f"row {row}: model version {version} was not reported by GetModelInfo "
                f"(known: {told})",
            )
    return None
