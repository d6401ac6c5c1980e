"""Services registered through :class:`~xylen_server.errors.InterceptedRegistration` reach the
server with every method handler wrapped: a service's own handlers
(``grpc.method_handlers_generic_handler``) wrapped once, at registration, and found per call by
one lookup; any other generic handler asked per call and its handler wrapped as before; an
unknown method is still UNIMPLEMENTED. A real grpc.aio server on a loopback port."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from xylen_server.errors import HandlerInterceptor


class Marking(HandlerInterceptor):
    """Prefixes every unary answer with ``wrapped:`` and counts the wrappings."""

    def __init__(self) -> None:
        super().__init__()
        self.wrapped_methods: list[str] = []

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        self.wrapped_methods.append(method)
        behavior = handler.unary_unary

        async def marked(request: bytes, context: Any) -> bytes:
            return b"wrapped:" + await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(marked)


async def _echo(request: bytes, context: Any) -> bytes:
    return request


class Dynamic(grpc.GenericRpcHandler):
    """A generic handler of its own kind: asked for every call."""

    def __init__(self) -> None:
        self.asked = 0

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        self.asked += 1
        if handler_call_details.method == "/test.Dynamic/Echo":
            return grpc.unary_unary_rpc_method_handler(_echo)
        return None


def test_every_registered_handler_is_wrapped_and_a_service_once() -> None:
    interceptor = Marking()
    dynamic = Dynamic()

    async def main() -> None:
        server = grpc.aio.server()
        registration = interceptor.registrar(server)
        registration.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Fixed", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
                ),
            )
        )
        assert interceptor.wrapped_methods == ["/test.Fixed/Echo"]  # at registration
        registration.add_generic_rpc_handlers((dynamic,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                fixed = channel.unary_unary("/test.Fixed/Echo")
                other = channel.unary_unary("/test.Dynamic/Echo")
                for n in range(3):
                    assert await fixed(b"a%d" % n) == b"wrapped:a%d" % n
                    assert await other(b"b%d" % n) == b"wrapped:b%d" % n
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await channel.unary_unary("/test.Fixed/Nothing")(b"")
                assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(0)

    asyncio.run(main())
    # The service's handler was wrapped once; the other generic handler was asked on every
    # call, and the handler it built anew each time was wrapped each time
    assert interceptor.wrapped_methods.count("/test.Fixed/Echo") == 1
    assert dynamic.asked >= 3
    assert interceptor.wrapped_methods.count("/test.Dynamic/Echo") == 3
