"""The coordinator sheds: past max_concurrent_predicts calls in flight, one more Predict is
refused at once with RESOURCE_EXHAUSTED (reason OVERLOADED) instead of queueing past its
deadline; the calls in flight are answered, and it serves again as soon as they are done.
A real coordinator process in front of a real (slow) model server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
from coordinator.coordinator_process import CoordinatorProcess
from coordinator.helpers import endpoint, write_config
from coordinator.lying_model_server import LyingModelServer
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator.config import parse_config


def test_over_the_limit_is_refused_at_once_and_the_rest_answered(
    tmp_path: Path,
    coordinator_factory: Callable[[Path], CoordinatorProcess],
) -> None:
    server = LyingModelServer("model_1")
    try:
        config = write_config(
            tmp_path / "config.yaml",
            [endpoint("model_1", server.port, 1.0)],
            deadline_ms=5000,
            max_concurrent_predicts=2,
        )
        coordinator = coordinator_factory(config)
        request = epb.EnsembleServicePredictRequest(
            inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=[0.0]))]
        )
        assert len(coordinator.stub.Predict(request, timeout=10).predictions[0].votes) == 1
        server.delay = 1.5
        calls = [coordinator.stub.Predict.future(request, timeout=20) for _ in range(6)]
        answered, refused = [], []
        for call in calls:
            try:
                answered.append(call.result())
            except grpc.RpcError as error:
                refused.append(error)
        assert len(answered) == 2 and len(refused) == 4
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            assert status is not None
            info = error_details_pb2.ErrorInfo()
            assert status.details[0].Unpack(info) and info.reason == "OVERLOADED"
        for response in answered:
            assert len(response.predictions[0].votes) == 1
        server.delay = 0.0
        assert len(coordinator.stub.Predict(request, timeout=10).predictions[0].votes) == 1
        assert "Predict shed (1 so far)" in coordinator.log()
        assert coordinator.stop() == 0
    finally:
        server.close()


def test_servers_shedding_load_are_passed_on_as_resource_exhausted(
    tmp_path: Path,
    coordinator_factory: Callable[[Path], CoordinatorProcess],
) -> None:
    # Both servers refuse the call for their load. The caller is told so, with the servers'
    # reason, in a status it retries with backoff; before, it was INVALID_ARGUMENT ("refused
    # the input"), which a caller must not retry.
    servers = [LyingModelServer("a"), LyingModelServer("b")]
    try:
        endpoints = [endpoint(s.info_name, s.port, 1.0) for s in servers]
        coordinator = coordinator_factory(write_config(tmp_path / "config.yaml", endpoints))
        request = epb.EnsembleServicePredictRequest(
            inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=[0.0]))]
        )
        assert len(coordinator.stub.Predict(request, timeout=10).predictions[0].votes) == 2
        for server in servers:
            server.shedding = True
        try:
            coordinator.stub.Predict(request, timeout=10)
        except grpc.RpcError as error:
            refused = error
        else:
            raise AssertionError("answered although every server shed the call")
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "at its limit" in refused.details()  # type: ignore[attr-defined]
        status = rpc_status.from_call(refused)  # type: ignore[arg-type]
        assert status is not None
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info) and info.reason == "OVERLOADED"
        for server in servers:
            server.shedding = False
        assert len(coordinator.stub.Predict(request, timeout=10).predictions[0].votes) == 2
        assert coordinator.stop() == 0
    finally:
        for server in servers:
            server.close()


def test_max_concurrent_predicts_is_validated() -> None:
    raw = {"model_endpoints": [{"name": "m", "host": "127.0.0.1", "port": 1}]}
    assert parse_config(raw).max_concurrent_predicts == 128
    for bad in (0, -1, 1.5, "many"):
        try:
            parse_config({**raw, "max_concurrent_predicts": bad})
        except ValueError as error:
            assert str(error).startswith("max_concurrent_predicts: ")
        else:
            raise AssertionError(f"{bad!r} accepted")
