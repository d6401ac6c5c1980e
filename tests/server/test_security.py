"""Who gets in, on real servers over loopback: TLS and mutual TLS with certificates from
``make certs``' generator, bearer tokens and mTLS identities on the admin RPCs, the status a
call without or with wrong credentials gets, a log that never holds the secret, grpcurl and
health checks over TLS, and a process that refuses to start with open admin RPCs on a
non-loopback address (never connected to: it must stop before binding)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from errorinfo import error_info
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import REPO, InProcessServer, feature_input, server_settings
from learning_helpers import wait_for
from server.api.test_grpcurl import grpcurl

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.auth import ServerSecurity, check_exposure, is_loopback
from xylen_server.devtools.certs import CertFiles, write_certs
from xylen_server.errors import SettingsError
from xylen_server.settings import Settings
from xylen_server.tls import ClientTls, open_channel

ADMIN_TOKEN = "s3cret-admin-token-for-tests"
PREDICT_TOKEN = "predict-token-for-tests"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return write_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def mtls_server(
    models_root: Path, certs: CertFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    """Mutual TLS; admin by the token or the identity ``coordinator``."""
    settings = server_settings(
        models_root,
        feedback_data_dir=tmp_path_factory.mktemp("mtls-data"),
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
        tls_client_ca_file=certs.ca,
        admin_token=ADMIN_TOKEN,
        admin_identities="coordinator",
        parity_probe_rows=64,
    )
    running = InProcessServer(settings)
    yield running
    running.close()


@pytest.fixture(scope="module")
def tls_server(
    models_root: Path, certs: CertFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    """TLS without client certificates; admin token and a predict token."""
    settings = server_settings(
        models_root,
        feedback_data_dir=tmp_path_factory.mktemp("tls-data"),
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
        admin_token=ADMIN_TOKEN,
        predict_token=PREDICT_TOKEN,
        parity_probe_rows=64,
    )
    running = InProcessServer(settings)
    yield running
    running.close()


def _stub(server: InProcessServer, tls: ClientTls | None) -> pb_grpc.ModelServiceStub:
    return pb_grpc.ModelServiceStub(open_channel(server.address, tls))


def _client(certs: CertFiles, who: str = "client") -> ClientTls:
    return ClientTls(ca=certs.ca, cert=certs.path(f"{who}.pem"), key=certs.path(f"{who}.key"))


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _predict_request(feature_rows) -> pb.PredictRequest:  # type: ignore[no-untyped-def]
    return pb.PredictRequest(inputs=[feature_input(feature_rows[0])])


# -- mutual TLS ------------------------------------------------------------------------------


def test_mtls_client_predicts_and_health_answers(mtls_server, certs, feature_rows):
    stub = _stub(mtls_server, _client(certs))
    response = stub.Predict(_predict_request(feature_rows), timeout=10)
    assert 0.0 <= response.predictions[0].probability_up <= 1.0
    channel = open_channel(mtls_server.address, _client(certs))
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="xylen.v1.ModelService"), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("tls", ["plaintext", "no client certificate"])
def test_mtls_refuses_a_client_without_a_certificate(mtls_server, certs, feature_rows, tls):
    client = None if tls == "plaintext" else ClientTls(ca=certs.ca)
    with pytest.raises(grpc.RpcError) as info:
        _stub(mtls_server, client).Predict(_predict_request(feature_rows), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_allowed_identity_may_reload_without_a_token(mtls_server, certs):
    response = _stub(mtls_server, _client(certs)).ReloadModel(pb.ReloadModelRequest(), timeout=60)
    assert response.model_info.version == 1 and not response.changed


def test_identity_not_allowed_is_denied_unless_it_has_the_token(mtls_server, certs):
    stub = _stub(mtls_server, _client(certs, "other"))
    with pytest.raises(grpc.RpcError) as info:
        stub.ReloadModel(pb.ReloadModelRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(info.value).reason == "IDENTITY_NOT_ALLOWED"
    assert "intruder" in info.value.details()
    response = stub.ReloadModel(pb.ReloadModelRequest(), metadata=_bearer(ADMIN_TOKEN), timeout=60)
    assert response.model_info.version == 1


def test_wrong_token_is_denied_and_the_log_holds_no_secret(mtls_server, certs, caplog):
    stub = _stub(mtls_server, _client(certs, "other"))
    wrong = "wrong-token-that-must-not-be-logged"
    with caplog.at_level(logging.INFO), pytest.raises(grpc.RpcError) as info:
        stub.RollbackModel(pb.RollbackModelRequest(), metadata=_bearer(wrong), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(info.value).reason == "INVALID_TOKEN"
    denied = [r.getMessage() for r in caplog.records if "denied" in r.getMessage()]
    assert any("RollbackModel" in m and "INVALID_TOKEN" in m for m in denied), denied
    assert wrong not in caplog.text and ADMIN_TOKEN not in caplog.text
    assert wrong not in info.value.details() and ADMIN_TOKEN not in info.value.details()


# -- TLS with tokens -------------------------------------------------------------------------


def test_predict_token_guards_predict(tls_server, certs, feature_rows):
    stub = _stub(tls_server, ClientTls(ca=certs.ca))
    request = _predict_request(feature_rows)
    with pytest.raises(grpc.RpcError) as missing:
        stub.Predict(request, timeout=10)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(missing.value).reason == "MISSING_CREDENTIALS"
    with pytest.raises(grpc.RpcError) as wrong:
        stub.Predict(request, metadata=_bearer("nope"), timeout=10)
    assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for token in (PREDICT_TOKEN, ADMIN_TOKEN):
        answer = stub.Predict(request, metadata=_bearer(token), timeout=10)
        assert len(answer.predictions) == 1
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=_bearer(PREDICT_TOKEN))
    assert info.model_info.name == "model_1"


def test_admin_rpcs_need_the_admin_token(tls_server, certs):
    stub = _stub(tls_server, ClientTls(ca=certs.ca))
    calls = {
        "Feedback": lambda md: stub.Feedback(pb.FeedbackRequest(prediction_id="x"), metadata=md),
        "Retrain": lambda md: stub.Retrain(pb.RetrainRequest(dry_run=True), metadata=md),
        "RollbackModel": lambda md: stub.RollbackModel(pb.RollbackModelRequest(), metadata=md),
        "ReloadModel": lambda md: stub.ReloadModel(pb.ReloadModelRequest(), metadata=md),
    }
    expected = [
        ((), grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS"),
        (_bearer(PREDICT_TOKEN), grpc.StatusCode.PERMISSION_DENIED, "TOKEN_NOT_ADMIN"),
        (_bearer("nope"), grpc.StatusCode.PERMISSION_DENIED, "INVALID_TOKEN"),
        ([("authorization", "Basic Zm9vOmJhcg==")], grpc.StatusCode.PERMISSION_DENIED, None),
    ]
    for name, call in calls.items():
        for metadata, code, reason in expected:
            with pytest.raises(grpc.RpcError) as info:
                call(metadata)
            assert info.value.code() == code, (name, metadata)
            if reason:
                assert error_info(info.value).reason == reason, name
    # With the token the call gets through to the handler (which judges the request itself).
    with pytest.raises(grpc.RpcError) as through:
        calls["Feedback"](_bearer(ADMIN_TOKEN))
    assert through.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # no close_time
    assert stub.ReloadModel(pb.ReloadModelRequest(), metadata=_bearer(ADMIN_TOKEN)).model_info


def test_health_and_reflection_stay_open_with_tokens(tls_server, certs):
    channel = open_channel(tls_server.address, ClientTls(ca=certs.ca))
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_client_that_does_not_trust_the_ca_is_refused(tls_server, tmp_path, feature_rows):
    stranger = write_certs(tmp_path / "other-ca")
    stub = _stub(tls_server, ClientTls(ca=stranger.ca))
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(_predict_request(feature_rows), metadata=_bearer(PREDICT_TOKEN), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# -- grpcurl over TLS --------------------------------------------------------------------------


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([grpcurl(), *args], capture_output=True, text=True, timeout=60)


def test_grpcurl_with_mutual_tls(mtls_server, certs, feature_rows):
    flags = [
        "-cacert",
        str(certs.ca),
        "-cert",
        str(certs.client_cert),
        "-key",
        str(certs.client_key),
    ]
    listed = _grpcurl(*flags, mtls_server.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert "xylen.v1.ModelService" in listed.stdout.split()
    health = _grpcurl(*flags, mtls_server.address, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and json.loads(health.stdout)["status"] == "SERVING"
    body = json.dumps({"inputs": [{"features": {"values": feature_rows[0].tolist()}}]})
    predicted = _grpcurl(*flags, "-d", body, mtls_server.address, "xylen.v1.ModelService/Predict")
    assert predicted.returncode == 0, predicted.stderr
    assert 0 <= json.loads(predicted.stdout)["predictions"][0]["probability_up"] <= 1
    without_cert = _grpcurl("-cacert", str(certs.ca), mtls_server.address, "list")
    assert without_cert.returncode != 0


def test_grpcurl_with_a_token(tls_server, certs):
    address = tls_server.address
    denied = _grpcurl("-cacert", str(certs.ca), address, "xylen.v1.ModelService/ReloadModel")
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
    header = f"authorization: Bearer {ADMIN_TOKEN}"
    allowed = _grpcurl(
        "-cacert", str(certs.ca), "-H", header, address, "xylen.v1.ModelService/ReloadModel"
    )
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["model_info"]["name"] == "model_1"


# -- secure defaults ---------------------------------------------------------------------------


def test_defaults_are_loopback_and_keep_tokens_out_of_repr():
    settings = Settings.from_env({"ADMIN_TOKEN": ADMIN_TOKEN, "PREDICT_TOKEN": PREDICT_TOKEN})
    assert Settings().host == "127.0.0.1"
    assert ADMIN_TOKEN not in repr(settings) and PREDICT_TOKEN not in repr(settings)
    assert ADMIN_TOKEN not in repr(ServerSecurity.from_settings(settings))


@pytest.mark.parametrize(
    ("host", "env", "refused"),
    [
        ("0.0.0.0", {}, True),
        ("[::]", {}, True),
        ("10.1.2.3", {}, True),
        ("127.0.0.1", {}, False),
        ("[::1]", {}, False),
        ("localhost", {}, False),
        ("0.0.0.0", {"ADMIN_TOKEN": ADMIN_TOKEN}, False),
        ("0.0.0.0", {"ALLOW_INSECURE_ADMIN": "true"}, False),
        (
            "0.0.0.0",
            {"TLS_CLIENT_CA_FILE": "ca.pem", "TLS_CERT_FILE": "c", "TLS_KEY_FILE": "k"},
            False,
        ),
    ],
)
def test_exposure_rule(host, env, refused):
    security = ServerSecurity.from_settings(Settings.from_env(env))
    if refused:
        with pytest.raises(SettingsError, match="ALLOW_INSECURE_ADMIN"):
            check_exposure(security, host)
    else:
        check_exposure(security, host)
    assert is_loopback(host) == (host in ("127.0.0.1", "[::1]", "localhost"))


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run(command, capture_output=True, text=True, env=full, cwd=REPO, timeout=120)


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_server_refuses_open_admin_on_every_interface(models_root, host):
    env = {"MODEL_PATH": str(models_root), "GRPC_HOST": host, "GRPC_PORT": "0"}
    result = _run([sys.executable, "-m", "xylen_server"], env)
    assert result.returncode == 2
    assert result.stdout == ""  # never listened
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ALLOW_INSECURE_ADMIN" in lines[0] and host in lines[0]


def test_coordinator_refuses_open_admin_on_every_interface(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model_endpoints:\n  - {name: m, host: 127.0.0.1, port: 1}\n")
    command = [sys.executable, "-m", "xylen_coordinator", "serve", "--config", str(config)]
    result = _run([*command, "--host", "0.0.0.0", "--port", "0"], {})
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ALLOW_INSECURE_ADMIN" in lines[0]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TLS_CERT_FILE": "/nonexistent/server.pem", "TLS_KEY_FILE": "/nonexistent/k"}, "TLS_KEY"),
        ({"TLS_CERT_FILE": "x.pem"}, "TLS_CERT_FILE and TLS_KEY_FILE go together"),
        ({"ADMIN_TOKEN_FILE": "/nonexistent/token"}, "ADMIN_TOKEN_FILE"),
        ({"ADMIN_IDENTITIES": "coordinator"}, "ADMIN_IDENTITIES needs TLS_CLIENT_CA_FILE"),
        ({"PREDICT_TOKEN": PREDICT_TOKEN}, "PREDICT_TOKEN without ADMIN_TOKEN"),
    ],
)
def test_unusable_security_settings_stop_the_server_with_one_line(models_root, env, message):
    result = _run(
        [sys.executable, "-m", "xylen_server"],
        {"MODEL_PATH": str(models_root), "GRPC_PORT": "0", **env},
    )
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_flood_of_refused_calls_logs_one_line_and_counts_every_call(
    models_root, tmp_path, caplog
):
    settings = server_settings(
        models_root, feedback_data_dir=tmp_path / "data", admin_token=ADMIN_TOKEN
    )
    server = InProcessServer(settings)
    try:
        stub = _stub(server, None)
        with caplog.at_level(logging.INFO):
            for _ in range(50):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Retrain(pb.RetrainRequest(), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        method = "/xylen.v1.ModelService/Retrain"
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("denied")]
        assert len(lines) == 1 and lines[0].startswith(f"denied {method} to ipv4:127.0.0.1:")
        assert "UNAUTHENTICATED MISSING_CREDENTIALS" in lines[0]
        # Counted after the status went out: give the last call's bookkeeping a moment.
        wait_for(lambda: server.running.recorder.calls(method, "UNAUTHENTICATED") >= 50, 10)
        assert server.running.recorder.calls(method, "UNAUTHENTICATED") == 50
    finally:
        server.close()
