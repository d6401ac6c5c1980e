"""Cross-cutting concerns of the model server as interceptors: measuring every RPC, of all four
call shapes (errors become status in :class:`~xylen_server.errors.ErrorStatusInterceptor`,
shared with the coordinator, which leaves the ErrorInfo reason in
:data:`~xylen_server.errors.error_reason` for this one to read)."""

from __future__ import annotations

import time
from typing import Any

import grpc

from xylen_server.api.metrics import Recorder
from xylen_server.errors import HandlerInterceptor, error_reason, wrap_behaviors


def _code_name(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return str(code)


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
                try:
                    return await behavior(request, context)
                finally:
                    recorder.rpc(
                        method,
                        _code_name(context),
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
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    recorder.rpc(
                        method,
                        _code_name(context),
                        time.perf_counter() - started,
                        error_reason.get(),
                        True,
                    )

            return timed

        return wrap_behaviors(handler, unary, streaming)
