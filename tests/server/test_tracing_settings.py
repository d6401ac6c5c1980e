"""Tracing is configured by the standard OTEL_* variables: off by default, OTLP when an endpoint
is set, console on request; anything else stops the server at start with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xylen_server.errors import SettingsError
from xylen_server.telemetry import traces_exporter_from_env

REPO = Path(__file__).resolve().parents[2]


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
    result = subprocess.run(
        [sys.executable, "-m", "xylen_server"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("xylen-server: error: OTEL_TRACES_EXPORTER")
