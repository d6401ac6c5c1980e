"""Bytes that do not parse as the request message get INVALID_ARGUMENT (reason
UNDECODABLE_REQUEST) with a short message, not grpc's UNKNOWN with the exception's name and a
traceback in the log per call (an unauthenticated way to fill the disk).

grpc's Python server calls a method's request deserializer before any interceptor sees the call
and answers UNKNOWN when it raises. :class:`UndecodableInterceptor` swaps in the model server's
deserializer that never raises (:mod:`xylen_server.decoding`, as its admission does): bytes that
do not parse become an :class:`~xylen_server.decoding.Undecodable` marker, which the wrapped
handler refuses with the same error (mapped to status by the ErrorStatusInterceptor outside
it). Each one is counted; the log gets the first and every 1000th.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from xylen_server.decoding import Undecodable, refusal, tolerant
from xylen_server.errors import HandlerInterceptor

logger = logging.getLogger(__name__)


class UndecodableInterceptor(HandlerInterceptor):
    """Refuses undecodable unary requests of the methods under ``prefix`` (the coordinator's
    EnsembleService RPCs are all unary)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.count = 0
        """Undecodable requests refused since start."""

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if not method.startswith(self.prefix) or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary

        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Undecodable):
                self.count += 1
                if self.count == 1 or self.count % 1000 == 0:
                    logger.warning(
                        "undecodable request refused (%d so far): %s, %d bytes",
                        self.count,
                        method,
                        request.size,
                    )
                raise refusal(request)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked, tolerant(handler.request_deserializer), handler.response_serializer
        )
