"""Cross-cutting concerns of the model server, on every call of every shape, in this order
(outermost first): metrics (count and time), errors to status with ErrorInfo, credentials,
admission (decoding, load shedding, field limits).

They are ONE wrapper, :class:`CallInterceptor`, put around each handler as services register
(:meth:`~xylen_server.errors.HandlerInterceptor.registrar`), not installed as a grpc
interceptor: grpc's aio server awaits every interceptor's ``intercept_service`` on every call,
a chain of coroutines before the handler even starts (four interceptors were four chains; one
no-op interceptor alone costs ~6 % of a bare echo's CPU per call). It wraps each method once and
keeps the wrapping. A unary-unary method (Predict above all) gets one fused
coroutine doing all four jobs; the other shapes get the parts' own wrappers nested in the same
order (:class:`MetricsInterceptor`, :class:`~xylen_server.errors.ErrorStatusInterceptor`,
:class:`~xylen_server.auth.AuthInterceptor`,
:class:`~xylen_server.api.admission.AdmissionInterceptor`), so each part keeps one definition of
what it does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from xylen_server import auth
from xylen_server.api.admission import UNQUEUED, AdmissionInterceptor, Sized
from xylen_server.api.limits import checker
from xylen_server.api.metrics import Recorder
from xylen_server.auth import AuthInterceptor
from xylen_server.decoding import refusal
from xylen_server.errors import (
    PASS_THROUGH,
    ErrorStatusInterceptor,
    HandlerInterceptor,
    error_reason,
    reason_of,
    to_grpc_status,
    wrap_behaviors,
)
from xylen_server.loops import LoopCache

_OK = "OK"
logger = logging.getLogger(__name__)


def _code_name(context: grpc.aio.ServicerContext[Any, Any], cancelled: bool = False) -> str:
    """The status a call ended with, for the metrics: its code, else, when grpc cancelled
    its handler (the caller went away or its deadline passed: the handler sets no code),
    CANCELLED or DEADLINE_EXCEEDED, else OK."""
    code = context.code()
    if code is not None:
        return _code_text(code)
    if cancelled:
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return _OK


def _code_text(code: Any) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class MetricsInterceptor(HandlerInterceptor):
    """Counts and times every call, unary and streaming, by method, final status code and
    ErrorInfo reason, and keeps the calls and streams in flight. Install it outermost, so the
    time covers the other interceptors (credentials, the error map) too."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        recorder = self.recorder

        streams = handler.response_streaming or handler.request_streaming

        def unary(behavior: Any) -> Any:
            async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started = time.perf_counter()
                error_reason.set("")
                recorder.started(method, streams)
                cancelled = False
                try:
                    return await behavior(request, context)
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                finally:
                    recorder.rpc(
                        method,
                        _code_name(context, cancelled),
                        time.perf_counter() - started,
                        error_reason.get(),
                        streams,
                    )

            return timed

        def streaming(behavior: Any) -> Any:
            async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started = time.perf_counter()
                error_reason.set("")
                recorder.started(method, True)
                cancelled = False
                try:
                    async for response in behavior(request, context):
                        yield response
                except (asyncio.CancelledError, GeneratorExit):  # grpc closed the stream
                    cancelled = True
                    raise
                finally:
                    recorder.rpc(
                        method,
                        _code_name(context, cancelled),
                        time.perf_counter() - started,
                        error_reason.get(),
                        True,
                    )

            return timed

        return wrap_behaviors(handler, unary, streaming)


class CallInterceptor(HandlerInterceptor):
    """Metrics, errors, credentials and admission as one interceptor (module docstring)."""

    def __init__(
        self, recorder: Recorder, credentials: AuthInterceptor, admission: AdmissionInterceptor
    ) -> None:
        self.recorder = recorder
        self.credentials = credentials
        self.admission = admission
        self._parts: list[HandlerInterceptor] = [
            admission,
            credentials,
            ErrorStatusInterceptor(),
            MetricsInterceptor(recorder),
        ]
        """Innermost first: how a method of any other shape is wrapped."""
        self._ended: list[tuple[str, str, float | None, str]] = []
        """Unary calls ended in this turn of the loop, recorded in its next
        (:meth:`_after_the_answers`)."""
        self._after: list[tuple[Callable[[Any], object], Any]] = []
        """Work handed over in this turn to run in the next (:meth:`after_the_answer`)."""
        self._running_loop = LoopCache().get
        super().__init__()  # asks grpc for each method's handler once and keeps the wrapping

    def after_the_answer(self, work: Callable[[Any], object], argument: Any) -> None:
        """Run ``work(argument)`` in the event loop's next turn, after grpc has sent the
        answers of this one, with the metrics of the calls ending in it: one callback a turn
        for both (the predictor hands its answers to the prediction log this way). Call on
        the event loop."""
        if not self._ended and not self._after:
            self._running_loop().call_soon(self._after_the_answers)
        self._after.append((work, argument))

    def _after_the_answers(self) -> None:
        after, ended = self._after[:], self._ended[:]  # the wrappers hold these very lists
        self._after.clear()
        self._ended.clear()
        for work, argument in after:
            try:
                work(argument)
            except Exception:  # one failure is not the others' (as separate callbacks were)
                logger.exception("the work handed over after an answer failed")
        self.recorder.calls_ended(ended)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` with all four concerns, built once per method."""
        if handler.unary_unary is not None and handler.request_deserializer is not None:
            return self._fused(method, handler)
        for part in self._parts:
            handler = part.wrap(method, handler)
        return handler

    def _fused(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """One coroutine per unary call doing what the four parts' wrappers do, in their order:
        no nested coroutines, no context variable for the reason, the decisions that depend
        only on the method (queued or not, which credentials) taken here, once."""
        behavior = handler.unary_unary
        recorder, admission = self.recorder, self.admission
        admit = admission.admit
        settings = admission.settings
        queued = method not in UNQUEUED
        check_request = checker(method)
        kind = auth.method_kind(method)
        check = self.credentials.checker(method, kind) if self.credentials.guards(kind) else None
        started_call = recorder.started
        ended, after = self._ended, self._after
        clock = time.perf_counter
        caller = auth.CALLER
        running_loop = self._running_loop
        after_the_answers = self._after_the_answers

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = clock()
            started_call(method, False)
            reason = ""
            cancelled = False
            try:
                reset = caller.set(check(context)) if check is not None else None
                try:
                    if request.__class__ is not Sized:  # Undecodable bytes
                        recorder.event("undecodable")
                        raise refusal(request)
                    message = request.message
                    if not queued:
                        return await behavior(message, context)
                    size = request.size
                    check_request(message, settings)
                    if not admit(size, context):  # a slot now, or wait in the queue for one
                        await admission.wait(size, context)
                    try:
                        return await behavior(message, context)
                    finally:
                        admission.release(size)
                finally:
                    if reset is not None:
                        caller.reset(reset)
            except asyncio.CancelledError:  # the caller went away, or its deadline passed
                cancelled = True
                raise
            except PASS_THROUGH:
                raise
            except Exception as exc:
                reason = reason_of(exc)
                await context.abort_with_status(to_grpc_status(exc))  # type: ignore[attr-defined]
            finally:
                # Counted and timed in the loop's next turn (grpc sends the answer first),
                # with every other call that ends in this turn and what was handed over in it.
                if not ended and not after:
                    running_loop().call_soon(after_the_answers)
                code = context.code()  # None when the handler answered: no call for an OK
                name = _OK if code is None and not cancelled else _code_name(context, cancelled)
                ended.append((method, name, clock() - started, reason))

        return admission.tolerant_handler(
            grpc.unary_unary_rpc_method_handler(
                call, handler.request_deserializer, handler.response_serializer
            ),
            handler.request_deserializer,
        )
