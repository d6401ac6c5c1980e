"""One error boundary: whatever a handler raises becomes its status and ErrorInfo.

The handlers below are added to a real model server (built by the composition root, with the
interceptors the product runs) and raise without any try/except of their own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from errorinfo import error_info
from harness import server_settings

from xylen_server.errors import (
    ERROR_DOMAIN,
    FailedPrecondition,
    InvalidArgument,
    ModelLoadError,
    VersionNotFound,
)

SERVICE = "xylen.test.Raising"


def _raise(exc: Exception) -> Any:
    async def unary(request: bytes, context: Any) -> bytes:
        raise exc

    async def streaming(request: Any, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        raise exc

    return unary, streaming


def _handlers() -> grpc.GenericRpcHandler:
    project_unary, project_stream = _raise(
        InvalidArgument("row 3 is bad", reason="ROW_IS_BAD", row=3)
    )
    bug_unary, _ = _raise(RuntimeError("secret internals"))
    missing_unary, _ = _raise(VersionNotFound("version 9 is not kept", version=9))
    load_unary, _ = _raise(ModelLoadError("model.onnx is corrupt"))
    identity = bytes

    def unary(fn: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(fn, identity, identity)

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Project": unary(project_unary),
            "Bug": unary(bug_unary),
            "Missing": unary(missing_unary),
            "Load": unary(load_unary),
            "Stream": grpc.unary_stream_rpc_method_handler(project_stream, identity, identity),
            "BidiStream": grpc.stream_stream_rpc_method_handler(project_stream, identity, identity),
        },
    )


@pytest.fixture(scope="module")
def channel(models_root: Path) -> Iterator[grpc.Channel]:
    from xylen_server.server import build_server

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    running = call(build_server(server_settings(models_root)))
    assert running.registration is not None
    running.registration.add_generic_rpc_handlers((_handlers(),))
    call(running.server.start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            yield ch
    finally:
        call(running.server.stop(0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _unary(channel: grpc.Channel, method: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(f"/{SERVICE}/{method}")(b"x", timeout=10)
    return caught.value


def test_a_project_error_gets_its_code_reason_and_metadata(channel: grpc.Channel):
    error = _unary(channel, "Project")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "row 3 is bad"
    info = error_info(error)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "ROW_IS_BAD",
        ERROR_DOMAIN,
        {"row": "3"},
    )


@pytest.mark.parametrize(
    ("method", "code", "reason"),
    [
        ("Missing", grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND"),
        ("Load", grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED"),
    ],
)
def test_every_class_of_the_tree_maps_to_its_code(channel: grpc.Channel, method, code, reason):
    error = _unary(channel, method)
    assert error.code() == code and error_info(error).reason == reason
    assert issubclass(ModelLoadError, FailedPrecondition)


def test_anything_else_is_internal_with_a_generic_message(channel: grpc.Channel):
    error = _unary(channel, "Bug")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details()
    assert error_info(error).reason == "INTERNAL"


@pytest.mark.parametrize("method", ["Stream", "BidiStream"])
def test_a_stream_that_raises_ends_with_the_status_after_what_it_sent(
    channel: grpc.Channel, method: str
):
    if method == "Stream":
        call = channel.unary_stream(f"/{SERVICE}/{method}")(b"x", timeout=10)
    else:
        call = channel.stream_stream(f"/{SERVICE}/{method}")(iter([b"x"]), timeout=10)
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        received.extend(call)
    assert received == [b"first"]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "ROW_IS_BAD"
