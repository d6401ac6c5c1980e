"""The metrics interceptor: every call counted by method and final status code, whatever its
shape (unary, server streaming, bidirectional)."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import InProcessServer, feature_input, server_settings, settled

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc


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


def test_calls_the_caller_gave_up_on_are_not_counted_ok(models_root, tmp_path, feature_rows):
    # Each inference takes 300 ms. Unary calls and streams whose deadline passes, or that the
    # caller cancels, while the server works on them end as grpc cancels the handler: they
    # are DEADLINE_EXCEEDED and CANCELLED in the metrics, as the caller saw them. They were
    # all counted OK (the handler sets no code when grpc cancels it).
    slow = InProcessServer(
        server_settings(models_root, inference_delay_ms=300.0, feedback_data_dir=tmp_path / "d")
    )
    recorder = slow.running.recorder
    request = pb.PredictRequest(inputs=[_features(feature_rows[0])])
    unary, stream = "/xylen.v1.ModelService/Predict", "/xylen.v1.ModelService/PredictStream"
    try:
        with grpc.insecure_channel(slow.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as late:
                    stub.Predict(request, timeout=0.05)
                assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            cancelled = stub.Predict.future(request, timeout=10)
            time.sleep(0.1)
            assert cancelled.cancel()
            items = [pb.PredictStreamRequest(request_id="a", request=request)]
            with pytest.raises(grpc.RpcError) as late:
                list(stub.PredictStream(iter(items), timeout=0.05))
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            gone = stub.PredictStream(iter(items), timeout=10)
            time.sleep(0.1)
            gone.cancel()
            assert _eventually(lambda: recorder.calls(unary, "DEADLINE_EXCEEDED") == 3)
            assert _eventually(lambda: recorder.calls(unary, "CANCELLED") == 1)
            assert _eventually(lambda: recorder.calls(stream, "DEADLINE_EXCEEDED") == 1)
            assert _eventually(lambda: recorder.calls(stream, "CANCELLED") == 1)
            time.sleep(0.5)  # the inferences under way end: nothing more is counted
            assert recorder.calls(unary, "OK") == recorder.calls(stream, "OK") == 0
    finally:
        slow.close()
