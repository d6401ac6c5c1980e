"""Every error xylen reports, and the one place that turns them into gRPC status.

The tree (each class fixes a canonical gRPC code; ``reason`` is the stable UPPER_SNAKE
``google.rpc.ErrorInfo.reason`` clients branch on, AIP-193)::

    XylenError              INTERNAL             root: code, reason, message, metadata
    ├── InvalidArgument     INVALID_ARGUMENT     a malformed request: features, candles, ids
    ├── NotFound            NOT_FOUND            another model, an unknown id or job
    │   └── VersionNotFound NOT_FOUND            a model version that is not kept
    ├── FailedPrecondition  FAILED_PRECONDITION  valid, but not in this state
    │   ├── ModelLoadError  FAILED_PRECONDITION  a model directory that cannot be served
    │   ├── HistoryError    FAILED_PRECONDITION  kept versions or an archive that disagree
    │   ├── TrainingDataMissing FAILED_PRECONDITION  a full retrain whose history files are gone
    │   └── SettingsError   FAILED_PRECONDITION  an environment variable it cannot use
    ├── ResourceExhausted   RESOURCE_EXHAUSTED   over a limit (rows, bytes, in flight)
    ├── Unavailable         UNAVAILABLE          not now: loading, shutting down, no quorum
    ├── Unauthenticated     UNAUTHENTICATED      no credentials where the RPC needs them
    ├── PermissionDenied    PERMISSION_DENIED    a wrong token, or an identity not allowed
    └── DeadlineExceeded    DEADLINE_EXCEEDED    the caller's time ran out

:class:`ErrorStatusInterceptor` maps whatever a handler raises: a :class:`XylenError` becomes
its status with one ErrorInfo (domain :data:`ERROR_DOMAIN`) in the trailers; anything else is a
bug, logged with its stack and answered INTERNAL with a generic message. Handlers therefore
raise and never catch to abort. Stream items carry the same mapping in their own status
(:func:`to_item_status`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any, TypeAlias

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from xylen.v1 import types_pb2

logger = logging.getLogger(__name__)

#: ErrorInfo.domain of every error xylen raises.
ERROR_DOMAIN = "xylen.dev"


class XylenError(Exception):
    """Root of every error xylen reports to a client or an operator."""

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


class VersionNotFound(NotFound):
    """A model version that is not kept in the history."""

    reason = "VERSION_NOT_FOUND"


class FailedPrecondition(XylenError):
    """The request is valid but the server is not in a state to do it."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class ModelLoadError(FailedPrecondition):
    """A model directory cannot be served (missing, corrupt, inconsistent, or failed the parity
    check). At start-up the process exits 2 with the message as its one line; on a swap the
    serving model stays."""

    reason = "MODEL_LOAD_FAILED"


class HistoryError(FailedPrecondition):
    """Kept versions, a backup archive or model files that disagree with their checksums."""

    reason = "MODEL_HISTORY_INVALID"


class TrainingDataMissing(FailedPrecondition):
    """A full retrain of a model whose training files (its metadata's ``data.files``) are not
    all there: it would quietly train on less, so it is refused with the path named."""

    reason = "TRAINING_HISTORY_MISSING"


class SettingsError(FailedPrecondition):
    """An environment variable holds a value the server cannot use (stops it at start-up)."""

    reason = "INVALID_SETTING"


class ResourceExhausted(XylenError):
    """The request exceeds a limit (batch size, in-flight items)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(XylenError):
    """The server cannot answer now (model loading, shutting down); retry elsewhere or later."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class Unauthenticated(XylenError):
    """The RPC needs credentials (a bearer token or an allowed mTLS identity) and the call
    carried none."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "MISSING_CREDENTIALS"


class PermissionDenied(XylenError):
    """The call's credentials are wrong or do not allow this RPC."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class DeadlineExceeded(XylenError):
    """The caller's time budget ran out before the answer was ready."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


#: Longest piece of a caller's own text an error message may quote.
SHOWN_CHARS = 64


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` as an error message may quote it: repr'd, never longer than ``limit``
    characters plus an ellipsis, so untrusted input cannot crowd the real reason out of the
    trailers."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


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


def to_item_status(exc: BaseException) -> types_pb2.ItemStatus:
    """The per-item status of a stream response for ``exc``."""
    code, reason, message, metadata = _classify(exc)
    return types_pb2.ItemStatus(
        code=code.value[0], message=message, reason=reason, metadata=metadata
    )


OK_ITEM_STATUS = types_pb2.ItemStatus(code=code_pb2.OK)

_Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
# Raised by context.abort(): the call already has its status; let it through.
PASS_THROUGH = (grpc.aio.AbortError, asyncio.CancelledError)


#: The ErrorInfo reason of the call being answered, for the metrics interceptor that wraps this
#: one (same task, so the same context): set here, read and reset there.
error_reason: ContextVar[str] = ContextVar("xylen_error_reason", default="")


async def _abort(context: _Context, exc: Exception) -> None:
    status = to_rpc_status(exc)
    error_reason.set(reason_of(exc))
    await context.abort_with_status(rpc_status.to_status(status))  # type: ignore[attr-defined]


def reason_of(exc: BaseException) -> str:
    """The ErrorInfo reason ``exc`` is answered with."""
    return exc.reason if isinstance(exc, XylenError) else "INTERNAL"


def _wrap_unary(behavior: Callable[[Any, _Context], Awaitable[Any]]) -> Any:
    async def handler(request: Any, context: _Context) -> Any:
        try:
            return await behavior(request, context)
        except PASS_THROUGH:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return handler


def _wrap_stream(behavior: Callable[[Any, _Context], AsyncIterator[Any]]) -> Any:
    async def handler(request: Any, context: _Context) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except PASS_THROUGH:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return handler


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps each method's handler once (:meth:`wrap`) and reuses the
    wrapping for every later call: it sits on every request, so no per-call rebuilding."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self.wrapped(handler_call_details.method, handler)

    def wrapped(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` of ``method`` wrapped, built on first use and kept."""
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def registrar(self, server: grpc.aio.Server) -> InterceptedRegistration:
        """``server`` as services register on it, with this interceptor around every handler
        they add (see :class:`InterceptedRegistration`)."""
        return InterceptedRegistration(server, self)


class _InterceptedHandlers(grpc.GenericRpcHandler):
    """A service's generic handler whose method handlers come out wrapped by ``interceptor``."""

    def __init__(self, handlers: grpc.GenericRpcHandler, interceptor: HandlerInterceptor) -> None:
        self._handlers = handlers
        self._interceptor = interceptor
        # A service's own handlers (grpc.method_handlers_generic_handler, as generated code
        # and grpc's health and reflection register) never change: wrapped once, here, and
        # found with one lookup per call instead of three Python calls.
        fixed = getattr(handlers, "_method_handlers", None)
        self._fixed: dict[str, grpc.RpcMethodHandler] | None = (
            {method: interceptor.wrapped(method, handler) for method, handler in fixed.items()}
            if isinstance(fixed, dict)
            else None
        )

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        fixed = self._fixed
        if fixed is not None:
            return fixed.get(handler_call_details.method)
        handler = self._handlers.service(handler_call_details)
        if handler is None:
            return None
        return self._interceptor.wrapped(handler_call_details.method, handler)


class InterceptedRegistration:
    """What services register on (``add_*Servicer_to_server(servicer, registration)``): every
    generic handler added through it reaches ``server`` wrapped by ``interceptor``.

    The same as installing the interceptor on the server, minus grpc's per-call interceptor
    pipeline: grpc's aio server runs a chain of coroutines through every interceptor's
    ``intercept_service`` on every call (~6 % of a bare echo's CPU per call, measured with one
    no-op interceptor), where a handler wrapped here is found like any other. Everything the
    server serves must be added through one of these (``xylen_server.server`` does, and
    ``tests/server/test_security.py`` checks that every method is guarded)."""

    def __init__(self, server: grpc.aio.Server, interceptor: HandlerInterceptor) -> None:
        self.server = server
        self._interceptor = interceptor

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(
            tuple(_InterceptedHandlers(h, self._interceptor) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """grpc's aio server ignores registered method handlers (it serves through the generic
        ones); kept wrapped for when it does not."""
        self.server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service,
            {
                name: self._interceptor.wrapped(f"/{service}/{name}", handler)
                for name, handler in handlers.items()
            },
        )


class ErrorStatusInterceptor(HandlerInterceptor):
    """Answers every RPC's exception with its status and ErrorInfo (see the module docstring).

    Installed on both servers, so no handler needs a try/except to report an error, and a
    handler added later cannot forget one.
    """

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return wrap_behaviors(handler, _wrap_unary, _wrap_stream)


def wrap_behaviors(
    handler: grpc.RpcMethodHandler,
    wrap_coroutine: Callable[[Any], Any],
    wrap_generator: Callable[[Any], Any],
) -> grpc.RpcMethodHandler:
    """``handler`` with its behavior wrapped, whatever its call shape: ``wrap_generator`` for a
    streaming behavior written as an async generator, ``wrap_coroutine`` for every other (unary
    ones, and streaming ones that write with ``context.write``, as grpc.health.v1's Watch)."""
    de, ser = handler.request_deserializer, handler.response_serializer

    def wrap(behavior: Any) -> Any:
        generator = inspect.isasyncgenfunction(behavior)
        return wrap_generator(behavior) if generator else wrap_coroutine(behavior)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), de, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), de, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), de, ser)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), de, ser)
