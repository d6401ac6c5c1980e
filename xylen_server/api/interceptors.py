"""Cross-cutting concerns as server interceptors: today, measuring every RPC.

Authentication for admin RPCs, tracing and rate limits belong here too, one interceptor each,
so servicers stay protobuf-in, domain call, protobuf-out.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from xylen_server.api.metrics import Recorder


def _code_name(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return str(code)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Records method, final status code and latency of every unary and streaming call."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        # Wrapping is built once per method, not per call: this sits on every request.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        recorder = self.recorder
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started = time.perf_counter()
                try:
                    return await behavior(request, context)
                finally:
                    recorder.rpc(method, _code_name(context), time.perf_counter() - started)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None:
            stream_behavior = handler.stream_stream

            async def stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started = time.perf_counter()
                try:
                    async for response in stream_behavior(requests, context):
                        yield response
                finally:
                    recorder.rpc(method, _code_name(context), time.perf_counter() - started)

            return grpc.stream_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler  # unary-stream and stream-unary: none in the contract yet
