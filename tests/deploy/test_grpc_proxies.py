"""deploy/nginx/ and deploy/haproxy/ run by a real nginx and HAProxy (Debian's packages,
installed by .ci/run) on loopback, each in front of two real servers of one model: unary Predict
calls and PredictStreams spread over both (counted by each server's own /metrics), the TLS and
mutual-TLS doors, and failover when one server is killed with SIGKILL.

The config files are the deployed ones; the test only moves the three listening ports and the
two replica addresses to free loopback ports (each substitution must match exactly once).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import harness
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from metrics_page import scrape, value

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.devtools.certs import CertFiles, write_certs
from xylen_server.tls import ClientTls, open_channel

ROOT = Path(__file__).resolve().parents[2]


def find(program: str) -> str | None:
    return shutil.which(program) or next(
        (p for d in ("/usr/sbin", "/usr/bin") if Path(p := f"{d}/{program}").exists()), None
    )


#: Per proxy: its config file, the three doors (plaintext, TLS, mTLS) and the two replicas as
#: the file writes them.
LAYOUT = {
    "nginx": (
        Path("deploy/nginx/nginx.conf"),
        ("listen 127.0.0.1:8100 ", "listen 127.0.0.1:8101 ", "listen 127.0.0.1:8102 "),
        ("server 127.0.0.1:8001 ", "server 127.0.0.1:8011 "),
    ),
    "haproxy": (
        Path("deploy/haproxy/haproxy.cfg"),
        ("bind 127.0.0.1:8200 ", "bind 127.0.0.1:8201 ", "bind 127.0.0.1:8202 "),
        ("replica_1 127.0.0.1:8001 ", "replica_2 127.0.0.1:8011 "),
    ),
}


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def calls(server: harness.ServerProcess, method: str) -> int:
    """Calls of ``method`` the server answered OK, from its own /metrics."""
    samples = scrape(server.metrics_url + "/metrics", timeout=5)
    return int(
        value(samples, "rpc_server_requests_total", rpc_method=method, rpc_grpc_status_code="OK")
    )


@dataclass
class Proxy:
    plain: str
    tls: str
    mtls: str
    certs: CertFiles
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module", params=sorted(LAYOUT))
def kind(request: pytest.FixtureRequest) -> str:
    program = str(request.param)
    if find(program) is None:
        pytest.skip(f"{program} is not installed (Debian package {program}; .ci/run installs it)")
    return program


@contextlib.contextmanager
def started_replicas(
    fleet_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[harness.ServerProcess]]:
    """Two servers of model_1, each with its own copy of the model and its own data."""
    servers = []
    try:
        for i in range(2):
            root = tmp_path_factory.mktemp(f"replica-{i}")
            shutil.copytree(fleet_models / "model_1", root / "model_1")
            servers.append(
                harness.start_server(
                    root,
                    "model_1",
                    wait=False,
                    env={"FEEDBACK_DATA_DIR": str(root / "data"), "SHUTDOWN_GRACE_SECONDS": "1"},
                )
            )
        for server in servers:
            server.wait_serving()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def replicas(
    kind: str, fleet_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[harness.ServerProcess]]:
    """Two live replicas shared by the tests of one proxy that kill nothing (fresh ones for
    each proxy)."""
    with started_replicas(fleet_models, tmp_path_factory) as servers:
        yield servers


def configure(
    kind: str, prefix: Path, ports: list[int], replicas: list[harness.ServerProcess]
) -> Path:
    """The deployed config files under ``prefix``, ports and replica addresses moved."""
    relative, doors, servers = LAYOUT[kind]
    shutil.copytree(ROOT / relative.parent, prefix / relative.parent)
    conf = prefix / relative
    text = conf.read_text()
    moves = {
        old: old.replace(old.split()[-1], f"127.0.0.1:{p}")
        for old, p in zip(doors, ports, strict=True)
    }
    moves.update(
        {
            old: old.replace(old.split()[-1], r.address)
            for old, r in zip(servers, replicas, strict=True)
        }
    )
    for old, new in moves.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    conf.write_text(text)
    return conf


def command(kind: str, prefix: Path, conf: Path, check: bool = False) -> list[str]:
    program = find(kind)
    assert program is not None
    if kind == "nginx":
        return [program, *(["-t"] if check else ["-g", "daemon off;"]), "-p", str(prefix),
                "-c", str(conf)]  # fmt: skip
    return [program, *(["-c"] if check else ["-db"]), "-f", str(conf)]


@contextlib.contextmanager
def started_proxy(
    kind: str, replicas: list[harness.ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """The proxy in front of ``replicas``, run as the config's header says (nginx with the
    prefix -p, HAProxy from the directory holding run/certs), in the foreground."""
    prefix = tmp_path_factory.mktemp(kind)
    certs = write_certs(prefix / "run" / "certs")  # where the config expects `make certs`' files
    bundle = certs.path("haproxy.pem")  # HAProxy's one-file certificate and key (its header)
    bundle.write_bytes(certs.server_cert.read_bytes() + certs.server_key.read_bytes())
    ports = free_ports(3)
    conf = configure(kind, prefix, ports, replicas)
    test = subprocess.run(
        command(kind, prefix, conf, check=True), capture_output=True, text=True, cwd=prefix
    )
    assert test.returncode == 0, test.stdout + test.stderr
    log_path = prefix / f"{kind}.stderr"
    log = open(log_path, "wb")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(command(kind, prefix, conf), stdout=log, stderr=log, cwd=prefix)
    plain, tls, mtls = (f"127.0.0.1:{p}" for p in ports)
    proxy = Proxy(plain, tls, mtls, certs=certs, proc=proc, log=log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                socket.create_connection(("127.0.0.1", ports[0]), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{kind} did not listen"
                time.sleep(0.05)
        yield proxy
    finally:
        proc.send_signal(signal.SIGQUIT if kind == "nginx" else signal.SIGUSR1)  # graceful stop
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def proxy(
    kind: str, replicas: list[harness.ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """The proxy in front of the shared replicas."""
    with started_proxy(kind, replicas, tmp_path_factory) as running:
        yield running


@pytest.fixture
def own_fleet(
    kind: str, fleet_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Proxy, list[harness.ServerProcess]]]:
    """A proxy and two replicas of its own, for a test that kills one: the shared ones stay
    whole whatever order the tests run in."""
    with (
        started_replicas(fleet_models, tmp_path_factory) as servers,
        started_proxy(kind, servers, tmp_path_factory) as running,
    ):
        yield running, servers


def request(feature_rows: np.ndarray, i: int = 0) -> pb.PredictRequest:
    return pb.PredictRequest(inputs=[harness.feature_input(feature_rows[i % len(feature_rows)])])


def predict_many(address: str, rows: np.ndarray, n: int, tls: ClientTls | None = None) -> None:
    with open_channel(address, tls) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        for i in range(n):
            response = stub.Predict(request(rows, i), timeout=10)
            assert len(response.predictions) == 1
            assert response.predictions[0].model_name == "model_1"


def run_streams(address: str, rows: np.ndarray, streams: int, items: int) -> None:
    """``streams`` PredictStreams open at once, ``items`` answered requests on each."""
    with open_channel(address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        futures = []
        for s in range(streams):
            items_in = [
                pb.PredictStreamRequest(request_id=f"{s}-{i}", request=request(rows, i))
                for i in range(items)
            ]
            futures.append((s, stub.PredictStream(iter(items_in), timeout=20)))
        for s, call in futures:
            answers = list(call)
            assert [a.request_id for a in answers] == [f"{s}-{i}" for i in range(items)]
            assert all(a.status.code == 0 and len(a.response.predictions) == 1 for a in answers)


def test_unary_calls_are_spread_over_both_replicas(
    kind: str, proxy: Proxy, replicas: list[harness.ServerProcess], feature_rows: np.ndarray
) -> None:
    before = [calls(s, "Predict") for s in replicas]
    predict_many(proxy.plain, feature_rows, 40)
    spread = [calls(s, "Predict") - b for s, b in zip(replicas, before, strict=True)]
    print(f"{kind} unary Predict: 40 calls over one channel -> per replica {spread}")
    assert sum(spread) == 40
    assert min(spread) >= 10, spread  # round robin per call: about half each


def test_predict_streams_are_spread_over_both_replicas(
    kind: str, proxy: Proxy, replicas: list[harness.ServerProcess], feature_rows: np.ndarray
) -> None:
    before = [calls(s, "PredictStream") for s in replicas]
    run_streams(proxy.plain, feature_rows, streams=6, items=5)
    spread = [calls(s, "PredictStream") - b for s, b in zip(replicas, before, strict=True)]
    print(f"{kind} PredictStream: 6 streams x 5 items -> streams per replica {spread}")
    assert sum(spread) == 6
    assert min(spread) >= 1, spread


def test_the_tls_door_serves_clients_that_trust_the_ca(
    kind: str, proxy: Proxy, replicas: list[harness.ServerProcess], feature_rows: np.ndarray
) -> None:
    before = [calls(s, "Predict") for s in replicas]
    predict_many(proxy.tls, feature_rows, 10, ClientTls(ca=proxy.certs.ca))
    spread = [calls(s, "Predict") - b for s, b in zip(replicas, before, strict=True)]
    print(f"{kind} TLS Predict: 10 calls -> per replica {spread}")
    assert sum(spread) == 10 and min(spread) >= 1, spread
    # Plaintext to the TLS door is no gRPC at all.
    with grpc.insecure_channel(proxy.tls) as channel, pytest.raises(grpc.RpcError) as error:
        pb_grpc.ModelServiceStub(channel).Predict(request(feature_rows), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_mtls_door_needs_a_client_certificate_of_the_ca(
    kind: str, proxy: Proxy, replicas: list[harness.ServerProcess], feature_rows: np.ndarray
) -> None:
    certs = proxy.certs
    mutual = ClientTls(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    before = [calls(s, "Predict") for s in replicas]
    predict_many(proxy.mtls, feature_rows, 10, mutual)
    spread = [calls(s, "Predict") - b for s, b in zip(replicas, before, strict=True)]
    print(f"{kind} mTLS Predict: 10 calls -> per replica {spread}")
    assert sum(spread) == 10 and min(spread) >= 1, spread
    with pytest.raises(grpc.RpcError) as error:
        predict_many(proxy.mtls, feature_rows, 1, ClientTls(ca=certs.ca))  # no client cert
    # No certificate: nginx answers HTTP 400 (no gRPC), HAProxy ends the handshake.
    assert error.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    assert sum(calls(s, "Predict") for s in replicas) == sum(before) + 10


def test_calls_and_streams_keep_succeeding_when_a_replica_is_killed(
    kind: str,
    own_fleet: tuple[Proxy, list[harness.ServerProcess]],
    feature_rows: np.ndarray,
) -> None:
    proxy, (victim, survivor) = own_fleet
    predict_many(proxy.plain, feature_rows, 4)  # both replicas have kept-alive connections
    assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
    before = calls(survivor, "Predict")
    before_streams = calls(survivor, "PredictStream")
    predict_many(proxy.plain, feature_rows, 30)  # every call must succeed
    run_streams(proxy.plain, feature_rows, streams=4, items=5)
    with open_channel(proxy.plain) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="xylen.v1.ModelService"), timeout=5
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    moved = calls(survivor, "Predict") - before
    streams = calls(survivor, "PredictStream") - before_streams
    print(f"{kind} failover: victim killed; 30/30 Predict and {streams}/4 streams on the survivor")
    assert moved == 30 and streams == 4
    if kind == "nginx":  # it did try the dead replica, and moved the call on
        log = proxy.log.read_text()
        assert re.search(r"connect\(\) failed .*Connection refused", log), log
