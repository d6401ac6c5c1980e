"""The lean unary path: one interceptor that still counts every call shape, maps every error
and checks every credential; the event-loop fast path answering as the pool does; a server
built without trace hooks; the latency histogram counted outside the OpenTelemetry SDK."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from errorinfo import error_info
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import InProcessServer, feature_input, server_settings, settled

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.api.metrics import LatencyHistogram
from xylen_server.auth import bearer_metadata
from xylen_server.serving.model_store import load_model
from xylen_server.serving.predictor import Predictor

SERVICE = "/xylen.v1.ModelService/"
ADMIN, READ = "admin-secret-token", "predict-secret-token"


def _eventually(check, timeout: float = 10.0) -> None:
    """The server records a call just after the client has its answer: wait for it."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the server never recorded the call"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def guarded(models_root: Path) -> Iterator[InProcessServer]:
    """A server whose read RPCs need the predict token and admin RPCs the admin token."""
    running = InProcessServer(server_settings(models_root, admin_token=ADMIN, predict_token=READ))
    yield running
    running.close()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_one_interceptor_counts_maps_and_guards_every_call_shape(guarded, feature_rows):
    recorder = guarded.running.recorder
    settled(recorder)
    token = bearer_metadata(READ)
    row = pb.PredictRequest(inputs=[feature_input(feature_rows[0])])
    before = {
        (method, code): recorder.calls(SERVICE + method, code)
        for method, code in [
            ("Predict", "OK"),
            ("Predict", "UNAUTHENTICATED"),
            ("Predict", "INVALID_ARGUMENT"),
            ("Feedback", "PERMISSION_DENIED"),
            ("Feedback", "UNAUTHENTICATED"),
            ("GetModelInfo", "OK"),
            ("PredictStream", "OK"),
            ("WatchRetrain", "NOT_FOUND"),
        ]
    }
    undecodable = recorder.events("undecodable")
    with grpc.insecure_channel(guarded.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        # unary, the fused path: credentials first, then admission, then the handler
        assert _code(lambda: stub.Predict(row)) == grpc.StatusCode.UNAUTHENTICATED
        answer = stub.Predict(row, metadata=token)
        assert len(answer.predictions) == 1 and 0 <= answer.predictions[0].probability_up <= 1
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(pb.PredictRequest(inputs=[feature_input([1.0, 2.0])]), metadata=token)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "FEATURE_COUNT_MISMATCH"
        raw = channel.unary_unary(SERVICE + "Predict")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff\xff\xff", metadata=token)
        assert error_info(caught.value).reason == "UNDECODABLE_REQUEST"
        # admin RPCs: a predict token is not enough, no token is not allowed
        feedback = pb.FeedbackRequest(prediction_id="x-1")
        with pytest.raises(grpc.RpcError) as caught:
            stub.Feedback(feedback, metadata=token)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value).reason == "TOKEN_NOT_ADMIN"
        assert _code(lambda: stub.Feedback(feedback)) == grpc.StatusCode.UNAUTHENTICATED
        # other shapes: unary, server streaming, bidirectional streaming, an open service
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=token).model_info.name
        answers = list(
            stub.PredictStream(
                iter([pb.PredictStreamRequest(request_id="a", request=row)]), metadata=token
            )
        )
        assert [a.request_id for a in answers] == ["a"] and answers[0].status.code == 0
        watch = stub.WatchRetrain(pb.WatchRetrainRequest(job_id="no-such-job"), metadata=token)
        assert _code(lambda: list(watch)) == grpc.StatusCode.NOT_FOUND
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    expected = {
        ("Predict", "OK"): 1,
        ("Predict", "UNAUTHENTICATED"): 1,
        ("Predict", "INVALID_ARGUMENT"): 2,
        ("Feedback", "PERMISSION_DENIED"): 1,
        ("Feedback", "UNAUTHENTICATED"): 1,
        ("GetModelInfo", "OK"): 1,
        ("PredictStream", "OK"): 1,
        ("WatchRetrain", "NOT_FOUND"): 1,
    }

    def counted() -> bool:
        # the health check too: it is counted as it ends on the server, which can be just
        # after the client has its answer (the full run once read 0 here)
        return recorder.calls("/grpc.health.v1.Health/Check", "OK") >= 1 and all(
            recorder.calls(SERVICE + method, code) - before[(method, code)] == n
            for (method, code), n in expected.items()
        )

    _eventually(counted)
    assert recorder.calls("/grpc.health.v1.Health/Check", "OK") >= 1
    assert recorder.errors(SERVICE + "Predict", "MISSING_CREDENTIALS") >= 1
    assert recorder.errors(SERVICE + "Predict", "UNDECODABLE_REQUEST") >= 1
    assert recorder.errors(SERVICE + "Feedback", "TOKEN_NOT_ADMIN") >= 1
    assert recorder.events("undecodable") == undecodable + 1
    active = recorder.snapshot(recorder._active)
    assert all(n == 0 for n in active.values()), active  # nothing left in flight
    assert guarded.running.admission is not None
    assert guarded.running.admission.running == 0
    assert guarded.running.admission.inflight_bytes == 0


def test_the_loop_fast_path_answers_what_the_pool_answers(models_root: Path, feature_rows):
    settings = server_settings(models_root)
    model = load_model(settings)
    try:
        loop_model = dataclasses.replace(model, loop_max_rows=8)
        pool_model = dataclasses.replace(model, loop_max_rows=0)

        async def answers(served) -> list:
            predictor = Predictor(settings)
            predictor.install(served)
            return [
                await predictor.predict(pb.PredictRequest(inputs=[feature_input(r)]))
                for r in feature_rows[:40]
            ]

        on_loop = asyncio.run(answers(loop_model))
        on_pool = asyncio.run(answers(pool_model))
    finally:
        model.close()
    assert all(r.on_loop for r in on_loop) and not any(r.on_loop for r in on_pool)
    loop_p = np.concatenate([r.probabilities for r in on_loop])
    pool_p = np.concatenate([r.probabilities for r in on_pool])
    assert len(set(np.round(loop_p, 6))) > 5  # real, varied answers
    np.testing.assert_array_equal(loop_p, pool_p)
    assert [r.signals for r in on_loop] == [r.signals for r in on_pool]
    ids = [i for r in on_loop + on_pool for i in r.prediction_ids]
    assert len(set(ids)) == len(ids) == 80


@pytest.mark.parametrize("hooks", [True, False])
def test_a_server_built_without_trace_hooks_opens_no_spans(
    models_root, feature_rows, span_exporter, hooks
):
    server = InProcessServer(server_settings(models_root, trace_hooks=hooks, metrics_port=0))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            answer = stub.Predict(pb.PredictRequest(inputs=[feature_input(feature_rows[3])]))
        assert len(answer.predictions) == 1
        names = {span.name for span in span_exporter.get_finished_spans()}
        if hooks:
            assert {"featurise", "inference", "log"} <= names, names
        else:
            assert names == set()
    finally:
        server.close()


def test_the_latency_histogram_counts_as_prometheus_buckets_do():
    histogram = LatencyHistogram(
        lambda method, code: {"rpc.method": method, "rpc.grpc.status_code": code},
        bounds=(0.001, 0.01),
    )
    for seconds in (0.0005, 0.001, 0.002, 0.5):  # a value on a bound is in that bucket (le)
        histogram.record(("Predict", "OK"), seconds)
    histogram.record(("Predict", "INTERNAL"), 0.02)
    (family,) = histogram.collect()
    assert family.name == "rpc_server_duration_seconds" and family.type == "histogram"
    samples = {
        (s.name, s.labels.get("le", ""), s.labels["rpc_grpc_status_code"]): s.value
        for s in family.samples
    }
    assert samples[("rpc_server_duration_seconds_bucket", "0.001", "OK")] == 2
    assert samples[("rpc_server_duration_seconds_bucket", "0.01", "OK")] == 3
    assert samples[("rpc_server_duration_seconds_bucket", "+Inf", "OK")] == 4
    assert samples[("rpc_server_duration_seconds_count", "", "OK")] == 4
    assert samples[("rpc_server_duration_seconds_sum", "", "OK")] == pytest.approx(0.5035)
    assert samples[("rpc_server_duration_seconds_bucket", "0.01", "INTERNAL")] == 0
    assert samples[("rpc_server_duration_seconds_count", "", "INTERNAL")] == 1
