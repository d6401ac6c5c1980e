"""Every method the model server serves runs inside its CallInterceptor (metrics, errors,
credentials, admission), now that the interceptor wraps handlers as they are registered rather
than sitting in grpc's per-call interceptor pipeline: a service added any other way would be
served unguarded and uncounted, and this test would name it.

The methods come from the server's own reflection (what a client can discover), each is called
with no credentials on a real server that has both tokens set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import InProcessServer, server_settings, settled

from xylen_server.auth import method_kind

ADMIN, READ = "admin-secret-token", "predict-secret-token"


@pytest.fixture(scope="module")
def guarded(models_root: Path) -> Iterator[InProcessServer]:
    running = InProcessServer(server_settings(models_root, admin_token=ADMIN, predict_token=READ))
    yield running
    running.close()


def _served_methods(channel: grpc.Channel) -> list[tuple[str, bool, bool]]:
    """(full method name, client streaming, server streaming) of every service reflected."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    listed = next(
        iter(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
    )
    services = [s.name for s in listed.list_services_response.service]
    methods = []
    for service in services:
        answer = next(
            iter(
                stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)])
                )
            )
        )
        for raw in answer.file_descriptor_response.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for declared in file.service:
                name = f"{file.package}.{declared.name}" if file.package else declared.name
                if name != service:
                    continue
                for method in declared.method:
                    methods.append(
                        (f"/{name}/{method.name}", method.client_streaming, method.server_streaming)
                    )
    return methods


def _call_without_credentials(
    channel: grpc.Channel, method: str, client_streaming: bool, server_streaming: bool
) -> grpc.StatusCode:
    """The status of one call of ``method`` with an empty message and no credentials."""
    try:
        if client_streaming and server_streaming:
            for _ in channel.stream_stream(method)(iter([b""]), timeout=5):
                pass
        elif client_streaming:
            channel.stream_unary(method)(iter([b""]), timeout=5)
        elif server_streaming:
            for _ in channel.unary_stream(method)(b"", timeout=5):
                break  # Watch-style streams stay open: the first answer (or error) is enough
        else:
            channel.unary_unary(method)(b"", timeout=5)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_every_reflected_method_is_counted_and_guarded(guarded):
    recorder = guarded.running.recorder
    with grpc.insecure_channel(guarded.address) as channel:
        methods = _served_methods(channel)
        served = {m for m, _, _ in methods}
        # Both of xylen's own services and the open ones are there to be checked.
        assert "/xylen.v1.ModelService/Predict" in served
        assert "/inference.GRPCInferenceService/ModelInfer" in served
        assert "/grpc.health.v1.Health/Check" in served
        assert len(methods) >= 15
        settled(recorder)
        before = {m: recorder.calls(m) for m in served}
        codes = {m: _call_without_credentials(channel, m, cs, ss) for m, cs, ss in methods}
    settled(recorder)
    uncounted = sorted(m for m in served if recorder.calls(m) <= before[m])
    assert not uncounted, f"served without the call interceptor: {uncounted}"
    for method, code in codes.items():
        if method_kind(method) in ("admin", "read"):
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code)
        else:
            assert code != grpc.StatusCode.UNAUTHENTICATED, (method, code)
