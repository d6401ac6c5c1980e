"""The floor: a bare grpc.aio server that returns the request bytes it got, with no protobuf
parsing and no work. ``python -m bench.echo_server`` prints ``echo listening on port N``.

``--port P --reuse-port`` binds port ``P`` (0: a free one) with ``SO_REUSEPORT``, so a second
echo process can join the first's port: the floor of two processes serving one port, as
``WORKERS=2`` does (``bench.bench_workers``)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

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


async def main(port: int = 0, reuse_port: bool = False) -> None:
    server = grpc.aio.server(
        options=server_options(Settings().max_message_bytes, reuse_port=reuse_port)
    )
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "EchoStream": grpc.stream_stream_rpc_method_handler(_echo_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo listening on port {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.echo_server")
    parser.add_argument("--port", type=int, default=0, help="on 127.0.0.1 (0: a free port)")
    parser.add_argument(
        "--reuse-port", action="store_true", help="SO_REUSEPORT: another echo may join the port"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    asyncio.run(main(args.port, args.reuse_port))
