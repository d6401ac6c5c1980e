"""Tracing is configured by the standard OTEL_* variables: off by default, OTLP when an endpoint
is set, console on request; anything else stops the server at start with one line."""

from __future__ import annotations

import pytest
from harness import server_run

from xylen_server.errors import SettingsError
from xylen_server.telemetry import traces_exporter_from_env


@pytest.mark.parametrize(
    ("environ", "exporter"),
    [
        ({}, "none"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "OTLP"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:1"}, "none"),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}, "none"),
    ],
)
def test_the_exporter_follows_the_standard_variables(environ, exporter):
    assert traces_exporter_from_env(environ) == exporter


def test_an_unknown_exporter_is_refused_naming_the_variable():
    with pytest.raises(SettingsError) as caught:
        traces_exporter_from_env({"OTEL_TRACES_EXPORTER": "zipkin" * 100})
    assert "OTEL_TRACES_EXPORTER" in str(caught.value) and len(str(caught.value)) < 200


def test_the_server_stops_at_start_on_an_unknown_exporter(models_root):
    env = {
        "PATH": "/usr/bin:/bin",
        "MODEL_PATH": str(models_root),
        "GRPC_PORT": "0",
        "METRICS_PORT": "0",
        "OTEL_TRACES_EXPORTER": "jaeger",
    }
    result = server_run(env)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("xylen-server: error: OTEL_TRACES_EXPORTER")


def test_a_traced_server_with_no_collector_serves_and_stops_cleanly(tmp_path, feature_rows):
    """OTLP to a loopback port where nothing listens: calls are answered, the failing exports
    stay on the exporter's thread, and SIGTERM still ends the process with 0 (the stop helper
    kills it, and the exit code says so, if it hangs in the flush)."""
    from coordinator.helpers import free_port
    from harness import feature_input, start_server, write_model

    from xylen.v1 import model_service_pb2 as pb

    write_model(tmp_path / "models", "model_1", "lightgbm", trees=20)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    server = start_server(tmp_path / "models", "model_1", env=env, log_dir=tmp_path)
    try:
        with server.channel() as channel:
            stub = server.stub(channel)
            for row in feature_rows[:600]:  # 2400 spans: the exporter's queue is full
                answer = stub.Predict(pb.PredictRequest(inputs=[feature_input(row)]))
                assert len(answer.predictions) == 1
    finally:
        assert server.stop(timeout=20) == 0
