"""The coordinator and model servers over mutual TLS, with credentials: real server processes
that demand client certificates and an admin token, the coordinator dialling them with its
``tls`` and ``auth`` config sections, forwarding outcomes with its token (stored as
authenticated on the servers), and refused by them without a client certificate. The
coordinator's own port with TLS and an admin token: Feedback without it is UNAUTHENTICATED,
health answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import harness
import pytest
from coordinator.helpers import endpoint, write_config
from errorinfo import error_info
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import ensemble_service_pb2_grpc as epb_grpc
from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator import Coordinator
from xylen_server.auth import ADMIN_TOKEN_IDENTITY
from xylen_server.devtools.certs import CertFiles, write_certs
from xylen_server.learning.samples import read_samples
from xylen_server.tls import ClientTls, open_channel

TOKEN = "fleet-admin-token"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return write_certs(tmp_path_factory.mktemp("fleet-certs"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "admin.token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def secure_servers(
    fleet_models: Path, certs: CertFiles, token_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[tuple[harness.ServerProcess, Path]]]:
    """Two servers on mutual TLS requiring the admin token, each with its own data dir."""
    started = []
    dial = ClientTls(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    try:
        for name in ("model_1", "model_2"):
            data = tmp_path_factory.mktemp(f"data-{name}")
            env = {
                "TLS_CERT_FILE": str(certs.server_cert),
                "TLS_KEY_FILE": str(certs.server_key),
                "TLS_CLIENT_CA_FILE": str(certs.ca),
                "ADMIN_TOKEN_FILE": str(token_file),
                "FEEDBACK_DATA_DIR": str(data),
                "RETRAIN_AUTO": "false",
                "PARITY_PROBE_ROWS": "64",
                "SHUTDOWN_GRACE_SECONDS": "1",
            }
            process = harness.start_server(fleet_models, name, env=env, tls=dial)
            started.append((process, data / name))
        yield started
    finally:
        for process, _ in started:
            process.stop()


def _config(path: Path, servers, certs: CertFiles, token_file: Path | None, client_cert=True):  # type: ignore[no-untyped-def]
    tls = {"enabled": True, "ca_file": str(certs.ca)}
    if client_cert:
        tls.update(cert_file=str(certs.client_cert), key_file=str(certs.client_key))
    sections: dict[str, object] = {
        "tls": tls,
        "retraining": {"feedback_delay_seconds": 0},
        "quorum": {"min_weight_fraction": 0.5, "min_votes": 1},
    }
    if token_file is not None:
        sections["auth"] = {"token_file": str(token_file)}
    endpoints = [endpoint(name, process.port, 0.5) for name, (process, _) in zip(
        ("model_1", "model_2"), servers, strict=True
    )]  # fmt: skip
    return write_config(path, endpoints, **sections)


def test_coordinator_votes_and_forwards_over_mutual_tls(
    secure_servers, certs, token_file, tmp_path, fleet_candles
):
    config = _config(tmp_path / "config.yaml", secure_servers, certs, token_file)
    with Coordinator(config) as coordinator:
        assert coordinator.wait_serving(timeout=30)
        window = harness.window_input(fleet_candles, len(fleet_candles["close"]) - 1)
        result = coordinator.predict([window], timeout=10)
        assert sorted(result.voters) == ["model_1", "model_2"] and not result.missing
        decision = result.rows[0]
        ack = coordinator.feedback(decision.prediction_id, realized_return=0.004)
        assert ack.prediction_id == decision.prediction_id

        def forwarded() -> bool:
            return (
                all(read_samples(data).height == 1 for _, data in secure_servers)
                and coordinator.pending_feedback() == 0
            )

        deadline = time.monotonic() + 30
        while not forwarded() and time.monotonic() < deadline:
            time.sleep(0.1)
        states = coordinator._call(coordinator.aio.delivery_states(decision.prediction_id))
        assert forwarded(), states
    for _, data in secure_servers:
        assert read_samples(data).get_column("source").to_list() == [ADMIN_TOKEN_IDENTITY]


def test_servers_refuse_a_coordinator_without_a_client_certificate(
    secure_servers, certs, token_file, tmp_path
):
    config = _config(tmp_path / "config.yaml", secure_servers, certs, token_file, False)
    with Coordinator(config) as coordinator:
        assert not coordinator.wait_serving(timeout=2)
        states = coordinator.endpoints()
        assert states and not any(state.serving for state in states)


def test_server_refuses_admin_rpcs_to_a_certificate_without_the_token(secure_servers, certs):
    process, _ = secure_servers[0]
    channel = open_channel(process.address, process.tls)
    from xylen.v1 import model_service_pb2_grpc as pb_grpc

    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.ModelServiceStub(channel).Feedback(pb.FeedbackRequest(prediction_id="x"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(info.value).reason == "IDENTITY_NOT_ALLOWED"
    channel.close()


def test_coordinator_port_with_tls_and_an_admin_token(secure_servers, certs, token_file, tmp_path):
    config = _config(tmp_path / "config.yaml", secure_servers, certs, token_file)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TLS_CERT_FILE": str(certs.server_cert),
        "TLS_KEY_FILE": str(certs.server_key),
        "ADMIN_TOKEN_FILE": str(token_file),
    }
    log = tmp_path / "coordinator.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xylen_coordinator", "serve", "--config", str(config),
             "--port", "0", "--grace", "1"],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=harness.REPO, env=env,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("xylen-coordinator listening on port "), log.read_text()
        address = f"127.0.0.1:{int(line.rsplit(' ', 1)[1])}"
        channel = open_channel(address, ClientTls(ca=certs.ca))
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.SERVING
        stub = epb_grpc.EnsembleServiceStub(channel)
        request = epb.EnsembleServiceFeedbackRequest(prediction_id="p-1")
        with pytest.raises(grpc.RpcError) as missing:
            stub.Feedback(request, timeout=5)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(missing.value).reason == "MISSING_CREDENTIALS"
        with pytest.raises(grpc.RpcError) as wrong:
            stub.Feedback(request, metadata=[("authorization", "Bearer nope")], timeout=5)
        assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as through:  # past the check: the request is judged
            stub.Feedback(request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5)
        assert through.value.code() not in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        )
        channel.close()
        assert TOKEN not in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_coordinator_with_a_token_refuses_to_take_anonymous_feedback(
    secure_servers, certs, token_file, tmp_path
):
    """Its token would make anyone's outcome authenticated on the servers: it needs credentials
    of its own (or ALLOW_INSECURE_ADMIN) before it serves, even on loopback."""
    config = _config(tmp_path / "config.yaml", secure_servers, certs, token_file)
    command = [sys.executable, "-m", "xylen_coordinator", "serve", "--config", str(config),
               "--port", "0"]  # fmt: skip
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=harness.REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "auth.token_file" in lines[0] and "ADMIN_TOKEN" in lines[0]
