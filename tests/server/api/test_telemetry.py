"""The metrics port of a real server: ``/metrics`` in the Prometheus text format (parsed with
``prometheus_client.parser``) moves with the calls made, and ``/health`` answers JSON."""

from __future__ import annotations

import json
import time
import urllib.request

import grpc
import metrics_page
import pytest
from errorinfo import error_info
from harness import InProcessServer, feature_input
from learning_helpers import learning_settings
from metrics_page import PROMETHEUS_TEXT, Sample, get, select, value

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc

PREDICT = {"rpc_method": "Predict", "rpc_service": "xylen.v1.ModelService"}


def scrape(port: int) -> list[Sample]:
    """Every sample of the server's ``/metrics``, served as Prometheus text."""
    return metrics_page.scrape(port, content_type=PROMETHEUS_TEXT)


def eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the metrics did not move"
        time.sleep(0.02)


def test_metrics_move_with_the_calls_and_parse_as_prometheus_text(two_versions, feature_rows):
    server = InProcessServer(learning_settings(two_versions))
    port = server.running.metrics_port
    assert port > 0
    try:
        before = scrape(port)
        assert value(before, "rpc_server_requests_total", **PREDICT) == 0
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            for row in feature_rows[:7]:
                stub.Predict(pb.PredictRequest(inputs=[feature_input(row)]))
            stub.Predict(pb.PredictRequest(inputs=[feature_input(r) for r in feature_rows[:300]]))
            with pytest.raises(grpc.RpcError) as caught:
                stub.Predict(pb.PredictRequest(inputs=[feature_input([1.0, 2.0])]))
            assert error_info(caught.value).reason == "FEATURE_COUNT_MISMATCH"
            moved = stub.RollbackModel(pb.RollbackModelRequest(version=2))
            assert moved.model_info.version == 2

        def settled() -> bool:
            now = scrape(port)
            return value(now, "rpc_server_requests_total", rpc_method="RollbackModel") == 1

        eventually(settled)
        after = scrape(port)
        ok = {**PREDICT, "rpc_grpc_status_code": "OK", "model": "model_1"}
        assert value(after, "rpc_server_requests_total", **ok) == 8
        assert value(after, "rpc_server_duration_seconds_count", **ok) == 8
        assert value(after, "rpc_server_duration_seconds_sum", **ok) > 0
        buckets = [
            s.labels["le"]
            for s in select(
                after,
                "rpc_server_duration_seconds_bucket",
                rpc_grpc_status_code="OK",
                rpc_method="Predict",
            )
        ]
        assert buckets[0] == "0.0001" and "1.0" in buckets and buckets[-1] == "+Inf"
        bad = {**PREDICT, "rpc_grpc_status_code": "INVALID_ARGUMENT"}
        assert value(after, "xylen_rpc_errors_total", reason="FEATURE_COUNT_MISMATCH", **bad) == 1
        assert value(after, "xylen_predict_rows_total") == 7 + 300
        assert value(after, "xylen_predict_executions_total", where="loop") == 7
        assert value(after, "xylen_predict_executions_total", where="pool") == 1
        assert value(after, "xylen_session_wait_time_seconds_total", where="pool") > 0
        assert value(after, "xylen_inference_time_seconds_total", where="loop") > 0
        assert value(after, "xylen_inference_time_seconds_total", where="pool") > 0
        assert value(after, "rpc_server_active_requests", **PREDICT) == 0
        info = select(after, "xylen_model_info")
        assert [(s.labels["model_version"], s.value) for s in info] == [("2", 1.0)]
        assert info[0].labels["model_type"] == "lightgbm" and info[0].labels["engine"] == "onnx"
        assert value(after, "xylen_model_version") == 2
        assert value(after, "xylen_model_serving") == 1
        assert value(after, "xylen_model_swaps_total", kind="rolled_back") == 1
        assert value(after, "xylen_model_swaps_total", kind="promoted") == 0
        assert value(after, "xylen_training_state", state="idle") == 1
        assert value(after, "xylen_training_state", state="running") == 0
        assert value(after, "xylen_training_jobs_total", result="failed") == 0
        assert value(after, "process_memory_rss_bytes") > 10e6
        assert value(after, "process_memory_limit_bytes") > value(after, "process_memory_rss_bytes")
        assert value(after, "process_cpu_time_seconds_total") > 0

        status, content_type, text = get(f"http://127.0.0.1:{port}/health")
        health = json.loads(text)
        assert (status, content_type) == (200, "application/json")
        assert health["status"] == "SERVING"
        assert (health["model_name"], health["model_version"]) == ("model_1", 2)
        assert health["model_type"] == "lightgbm" and health["engine"] == "onnx"
        assert health["training_samples"] > 0 and health["trained_at"].endswith("Z")
        assert health["training_state"] == "idle"
        assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404
    finally:
        server.close()
    with pytest.raises(OSError):  # the port closes with the server
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_feedback_and_streams_are_counted(two_versions, feature_rows):
    # Its own server and feedback store: the shared default directory may be held by another
    # test's server.
    server = InProcessServer(learning_settings(two_versions))
    try:
        with grpc.insecure_channel(server.address) as channel:
            feedback_and_streams(server, pb_grpc.ModelServiceStub(channel), feature_rows)
    finally:
        server.close()


def feedback_and_streams(server, stub, feature_rows):
    port = server.running.metrics_port
    answer = stub.Predict(pb.PredictRequest(inputs=[feature_input(feature_rows[0])]))
    before = scrape(port)
    stream = "PredictStream"
    requests = [
        pb.PredictStreamRequest(
            request_id=str(i), request=pb.PredictRequest(inputs=[feature_input(r)])
        )
        for i, r in enumerate(feature_rows[:3])
    ]
    answers = list(stub.PredictStream(iter(requests)))
    assert [a.status.code for a in answers] == [0, 0, 0]
    outcome = pb.TradeOutcome(pnl=1.0, realized_return=0.01, side=pb.TRADE_SIDE_LONG)
    outcome.close_time.GetCurrentTime()
    prediction_id = answer.predictions[0].prediction_id
    stub.Feedback(pb.FeedbackRequest(prediction_id=prediction_id, outcome=outcome))
    stub.Feedback(pb.FeedbackRequest(prediction_id=prediction_id, outcome=outcome))

    def moved() -> bool:
        now = scrape(port)
        return (
            value(now, "rpc_server_requests_total", rpc_method="Feedback")
            == value(before, "rpc_server_requests_total", rpc_method="Feedback") + 2
            and value(now, "rpc_server_requests_total", rpc_method=stream) == 1
        )

    eventually(moved)
    after = scrape(port)
    assert (
        value(after, "xylen_feedback_acknowledged_total")
        - value(before, "xylen_feedback_acknowledged_total")
        == 2
    )
    assert value(after, "xylen_training_samples") == value(before, "xylen_training_samples") + 1
    assert value(after, "xylen_predict_rows_total") - value(before, "xylen_predict_rows_total") == 3
    assert value(after, "xylen_rpc_open_streams", rpc_method=stream) == 0
