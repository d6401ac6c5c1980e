"""Cross-cutting concerns of the model server as interceptors: measuring every RPC, of all four
call shapes (errors become status in :class:`~xylen_server.errors.ErrorStatusInterceptor`,
shared with the coordinator)."""

from __future__ import annotations

from typing import Any

import grpc

from xylen_server.api.metrics import Recorder
from xylen_server.errors import HandlerInterceptor, wrap_behaviors


def _code_name(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return str(code)


class MetricsInterceptor(HandlerInterceptor):
    """Counts every call, unary and streaming, by method and final status code."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        recorder = self.recorder

        def unary(behavior: Any) -> Any:
            async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    return await behavior(request, context)
                finally:
                    recorder.rpc(method, _code_name(context))

            return timed

        def streaming(behavior: Any) -> Any:
            async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    recorder.rpc(method, _code_name(context))

            return timed

        return wrap_behaviors(handler, unary, streaming)
