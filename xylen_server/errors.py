"""The server's error tree, and the one place that turns errors into gRPC status.

Every error a client can cause is a :class:`XylenError` carrying a canonical gRPC code and a
stable UPPER_SNAKE ``reason`` (google.rpc.ErrorInfo, AIP-193), so clients branch on the reason,
never on message text. Anything else is a bug: it is logged with its stack and answered INTERNAL
with a generic message.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from xylen.v1 import types_pb2

logger = logging.getLogger(__name__)

#: ErrorInfo.domain of every error xylen raises.
ERROR_DOMAIN = "xylen.dev"


class XylenError(Exception):
    """Root of every error the server reports to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = {key: str(value) for key, value in metadata.items()}


class InvalidArgument(XylenError):
    """The request is malformed: wrong feature count, non-finite values, bad candles."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(XylenError):
    """The request names something this server does not have, e.g. another model."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class FailedPrecondition(XylenError):
    """The request is valid but the server is not in a state to do it."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(XylenError):
    """The request exceeds a limit (batch size, in-flight items)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(XylenError):
    """The server cannot answer now (model loading, shutting down); retry elsewhere or later."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceeded(XylenError):
    """The caller's time budget ran out before the answer was ready."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class ModelLoadError(Exception):
    """The model cannot be served (missing, corrupt, inconsistent, or failed the parity check).

    Raised at start-up only; the process exits non-zero with this message as its one line.
    """


def _classify(exc: BaseException) -> tuple[grpc.StatusCode, str, str, dict[str, str]]:
    if isinstance(exc, XylenError):
        return exc.code, exc.reason, exc.message, exc.metadata
    logger.error("unexpected error while handling a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "INTERNAL", "internal error; see the server log", {}


def to_rpc_status(exc: BaseException) -> status_pb2.Status:
    """google.rpc.Status with one google.rpc.ErrorInfo detail for ``exc``."""
    code, reason, message, metadata = _classify(exc)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    return status_pb2.Status(code=code.value[0], message=message, details=[detail])


def to_grpc_status(exc: BaseException) -> grpc.Status:
    """A status for ``context.abort_with_status`` carrying the ErrorInfo in its trailers."""
    return rpc_status.to_status(to_rpc_status(exc))


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End the call with the status for ``exc`` (ErrorInfo in the trailers)."""
    await context.abort_with_status(to_grpc_status(exc))  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")


def to_item_status(exc: BaseException) -> types_pb2.ItemStatus:
    """The per-item status of a stream response for ``exc``."""
    code, reason, message, metadata = _classify(exc)
    return types_pb2.ItemStatus(
        code=code.value[0], message=message, reason=reason, metadata=metadata
    )


OK_ITEM_STATUS = types_pb2.ItemStatus(code=code_pb2.OK)
