"""The metrics interceptor: every call counted by method and final status code, whatever its
shape (unary, server streaming, bidirectional)."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import feature_input, settled

from xylen.v1 import model_service_pb2 as pb


def _features(row):
    return feature_input(row)


def _eventually(check, timeout: float = 10.0) -> bool:
    """The server records a call just after the client has its answer: wait for it."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_metrics_interceptor_counts_every_call_by_code(server, stub, feature_rows):
    recorder = server.running.recorder
    settled(recorder)
    method = "/xylen.v1.ModelService/Predict"
    ok_before = recorder.calls(method, "OK")
    bad_before = recorder.calls(method, "INVALID_ARGUMENT")
    for row in feature_rows[:5]:
        stub.Predict(pb.PredictRequest(inputs=[_features(row)]))
    with pytest.raises(grpc.RpcError):
        stub.Predict(pb.PredictRequest())
    assert _eventually(lambda: recorder.calls(method, "INVALID_ARGUMENT") == bad_before + 1)
    assert recorder.calls(method, "OK") == ok_before + 5
    stream = "/xylen.v1.ModelService/PredictStream"
    before = recorder.calls(stream)
    request = pb.PredictRequest(inputs=[_features(feature_rows[0])])
    items = [pb.PredictStreamRequest(request_id="a", request=request)]
    assert len(list(stub.PredictStream(iter(items)))) == 1
    assert _eventually(lambda: recorder.calls(stream, "OK") == before + 1)


def test_server_streaming_calls_are_counted_too(server, stub, channel):
    recorder = server.running.recorder
    watch = "/xylen.v1.ModelService/WatchRetrain"
    before = recorder.calls(watch, "OK")
    statuses = list(stub.WatchRetrain(pb.WatchRetrainRequest(), timeout=10))
    assert [s.status.state for s in statuses] == [pb.TRAINING_STATE_IDLE]
    assert _eventually(lambda: recorder.calls(watch, "OK") == before + 1)
    missing_before = recorder.calls(watch, "NOT_FOUND")
    with pytest.raises(grpc.RpcError):
        list(stub.WatchRetrain(pb.WatchRetrainRequest(job_id="no-such-job"), timeout=10))
    assert _eventually(lambda: recorder.calls(watch, "NOT_FOUND") == missing_before + 1)
    # grpc.health.v1 Watch writes with context.write instead of yielding: counted all the same.
    health = "/grpc.health.v1.Health/Watch"
    health_before = recorder.calls(health)
    answers = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert next(answers).status == health_pb2.HealthCheckResponse.SERVING
    answers.cancel()
    assert _eventually(lambda: recorder.calls(health) == health_before + 1)
