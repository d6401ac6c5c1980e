"""The floor: a bare grpc.aio server that returns the request bytes it got, with no protobuf
parsing and no work. ``python -m bench.echo_server`` prints ``echo listening on port N``."""

from __future__ import annotations

import asyncio
import signal

import grpc

from xylen_server.health import server_options
from xylen_server.settings import Settings

METHOD = "/bench.Echo/Echo"
STREAM_METHOD = "/bench.Echo/EchoStream"


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _echo_stream(requests, context):  # type: ignore[no-untyped-def]
    async for request in requests:
        yield request


async def main() -> None:
    server = grpc.aio.server(options=server_options(Settings().max_message_bytes))
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "EchoStream": grpc.stream_stream_rpc_method_handler(_echo_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo listening on port {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
