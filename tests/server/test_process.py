"""The server as a real process: start-up refusals, health before and after load, SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from errorinfo import error_info
from grpc_health.v1 import health_pb2
from harness import feature_input, health_status, server_run, start_server

from xylen.v1 import model_service_pb2 as pb


def run_to_exit(
    models_root: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full = {
        "PATH": "/usr/bin:/bin",
        "MODEL_PATH": str(models_root),
        "MODEL_NAME": "model_1",
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": "0",
        "METRICS_PORT": "0",
        **env,
    }
    return server_run(full, timeout)


def _copy_model(models_root: Path, tmp_path: Path, checksums: bool = True) -> Path:
    """A private copy of the session's model; without checksums, like a model from before
    metadata recorded them, so the library's own checks are what stands between us and garbage."""
    root = tmp_path / "models"
    shutil.copytree(models_root / "model_1", root / "model_1")
    if not checksums:
        path = root / "model_1" / "metadata.json"
        meta = json.loads(path.read_text())
        meta["checksums"] = {}
        path.write_text(json.dumps(meta))
    return root


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    errors = [
        line for line in result.stderr.splitlines() if line.startswith("xylen-server: error:")
    ]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stderr


def test_corrupt_model_file_exits_non_zero_with_one_clear_line(models_root, tmp_path):
    root = _copy_model(models_root, tmp_path, checksums=False)
    (root / "model_1" / "lightgbm_model.txt").write_text("tree\nthis is not a model\n")
    (root / "model_1" / "model.onnx").unlink(missing_ok=True)
    result = run_to_exit(root, {})
    assert_one_clear_line(result, "model_1", "cannot load", "lightgbm_model.txt")


def test_truncated_model_file_is_refused(models_root, tmp_path):
    root = _copy_model(models_root, tmp_path, checksums=False)
    native = root / "model_1" / "lightgbm_model.txt"
    native.write_bytes(native.read_bytes()[: native.stat().st_size // 2])
    result = run_to_exit(root, {})
    assert_one_clear_line(result, "model_1")


def test_a_changed_byte_fails_the_checksum(models_root, tmp_path):
    root = _copy_model(models_root, tmp_path)
    native = root / "model_1" / "lightgbm_model.txt"
    data = bytearray(native.read_bytes())
    position = data.index(b"leaf_value=") + len("leaf_value=")
    data[position] = ord("9") if data[position] != ord("9") else ord("8")
    native.write_bytes(bytes(data))
    assert_one_clear_line(run_to_exit(root, {}), "lightgbm_model.txt", "corrupt", "sha256")


def test_missing_model_exits_non_zero(models_root):
    result = run_to_exit(models_root, {"MODEL_NAME": "model_404"})
    assert_one_clear_line(result, "model_404", "not found")


def test_missing_metadata_exits_non_zero(models_root, tmp_path):
    root = _copy_model(models_root, tmp_path)
    (root / "model_1" / "metadata.json").unlink()
    assert_one_clear_line(run_to_exit(root, {}), "metadata", "missing")


def test_model_trained_with_other_features_is_refused(models_root, tmp_path):
    root = _copy_model(models_root, tmp_path)
    path = root / "model_1" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["features_hash"] = "0" * 64
    path.write_text(json.dumps(meta))
    assert_one_clear_line(run_to_exit(root, {}), "feature definitions", "retrain")


def test_corrupt_onnx_beside_a_good_model_is_reconverted(models_root, tmp_path):
    root = _copy_model(models_root, tmp_path)
    (root / "model_1" / "model.onnx").write_bytes(b"\x00garbage")
    server = start_server(root, log_dir=tmp_path)
    try:
        with server.channel() as channel:
            info = server.stub(channel).GetModelInfo(pb.GetModelInfoRequest()).model_info
        assert info.engine == pb.ENGINE_ONNX
        assert (root / "model_1" / "model.onnx").stat().st_size > 1000
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"GRPC_PORT": "eighty"}, "GRPC_PORT"),
        ({"GRPC_PORT": "70000"}, "GRPC_PORT"),
        ({"ONNX_ENABLED": "maybe"}, "ONNX_ENABLED"),
        ({"SESSION_POOL_SIZE": "0"}, "SESSION_POOL_SIZE"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"BUY_THRESHOLD": "0.4", "SELL_THRESHOLD": "0.6"}, "BUY_THRESHOLD"),
    ],
)
def test_bad_configuration_exits_with_a_clear_error(models_root, env, fragment):
    assert_one_clear_line(run_to_exit(models_root, env, timeout=60), fragment)


def test_health_is_not_serving_until_the_model_is_verified(models_root, tmp_path):
    # A large parity probe makes loading take a while, long enough to look at health during it.
    server = start_server(
        models_root, env={"PARITY_PROBE_ROWS": "1000000"}, wait=False, log_dir=tmp_path
    )
    try:
        with server.channel() as channel:
            assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert (
                health_status(channel, "xylen.v1.ModelService")
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            with pytest.raises(grpc.RpcError) as caught:
                server.stub(channel).Predict(pb.PredictRequest(inputs=[feature_input([0.0] * 25)]))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(caught.value).reason == "MODEL_LOADING"
            server.wait_serving(timeout=180)
            assert (
                health_status(channel, "xylen.v1.ModelService")
                == health_pb2.HealthCheckResponse.SERVING
            )
    finally:
        assert server.stop() == 0


def test_sigterm_completes_requests_in_flight_then_exits_zero(models_root, tmp_path, feature_rows):
    server = start_server(models_root, env={"INFERENCE_DELAY_MS": "1500"}, log_dir=tmp_path)
    request = pb.PredictRequest(inputs=[feature_input(feature_rows[0])])
    with server.channel() as channel, ThreadPoolExecutor(4) as pool:
        stub = server.stub(channel)
        calls = [pool.submit(stub.Predict, request, timeout=60) for _ in range(4)]
        time.sleep(0.5)  # let the calls reach the server; each then takes 1.5 s
        server.proc.send_signal(signal.SIGTERM)
        answers = [call.result() for call in calls]
        assert all(len(a.predictions) == 1 for a in answers)
        assert server.proc.wait(30) == 0
    log = server.log()
    assert "NOT_SERVING, draining" in log and "stopped cleanly" in log


def test_sigterm_turns_health_to_not_serving_while_draining(models_root, tmp_path, feature_rows):
    server = start_server(
        models_root,
        env={"INFERENCE_DELAY_MS": "2000", "SHUTDOWN_GRACE_SECONDS": "10"},
        log_dir=tmp_path,
    )
    request = pb.PredictRequest(inputs=[feature_input(feature_rows[0])])
    with server.channel() as channel, ThreadPoolExecutor(1) as pool:
        call = pool.submit(server.stub(channel).Predict, request, timeout=60)
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        with grpc.insecure_channel(server.address) as fresh:
            statuses = set()
            for _ in range(20):
                try:
                    statuses.add(health_status(fresh, timeout=0.5))
                except grpc.RpcError:
                    statuses.add("refused")
                if statuses - {health_pb2.HealthCheckResponse.SERVING}:
                    break
                time.sleep(0.05)
        assert statuses - {health_pb2.HealthCheckResponse.SERVING}, statuses
        assert len(call.result().predictions) == 1
    assert server.proc.wait(30) == 0


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_server_serves_on_ipv6_loopback(models_root, tmp_path, feature_rows, host):
    """GRPC_HOST=::1 (bare or bracketed) binds the IPv6 loopback: the gRPC address is bracketed."""
    server = start_server(models_root, env={"GRPC_HOST": host}, log_dir=tmp_path)
    try:
        assert server.address == f"[::1]:{server.port}"
        with server.channel() as channel:
            answer = server.stub(channel).Predict(
                pb.PredictRequest(inputs=[feature_input(feature_rows[0])]),
                timeout=30,
            )
        assert len(answer.predictions) == 1
        with urllib.request.urlopen(f"{server.metrics_url}/health", timeout=10) as response:
            assert json.loads(response.read())["model_version"] >= 1
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "xylen-server"
    assert script.exists()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "MODEL_NAME" in result.stdout
