"""`xylen-server model rollback --address` against a server on mutual TLS with an admin token:
the CLI's --ca/--cert/--key/--server-name/--token-file options, the server's own ADMIN_TOKEN as
the default credential, and one error line for a refused call."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import InProcessServer, write_model
from learning_helpers import add_version, learning_settings

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.__main__ import main
from xylen_server.devtools.certs import CertFiles, write_certs
from xylen_server.tls import ClientTls, open_channel

TOKEN = "cli-admin-token"


@pytest.fixture
def secure(
    tmp_path: Path, candles, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[InProcessServer, CertFiles, pb_grpc.ModelServiceStub]]:
    models = tmp_path / "models"
    write_model(models, "model_1", "lightgbm", candles, trees=30)
    add_version(models, 2, seed=2)
    add_version(models, 3, seed=3)
    certs = write_certs(tmp_path / "certs")
    for var, value in {
        "MODEL_PATH": str(models),
        "MODEL_NAME": "model_1",
        "FEEDBACK_DATA_DIR": str(tmp_path / "data"),
        "LOG_LEVEL": "WARNING",
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    server = InProcessServer(
        learning_settings(
            tmp_path,
            tls_cert_file=certs.server_cert,
            tls_key_file=certs.server_key,
            tls_client_ca_file=certs.ca,
            admin_token=TOKEN,
        )
    )
    dial = ClientTls(ca=certs.ca, cert=certs.other_cert, key=certs.other_key)
    channel = open_channel(server.address, dial)
    yield server, certs, pb_grpc.ModelServiceStub(channel)
    channel.close()
    server.close()


def _serving(stub: pb_grpc.ModelServiceStub) -> int:
    return stub.GetModelInfo(pb.GetModelInfoRequest()).model_info.version


def test_rollback_over_mutual_tls_with_a_token(secure, tmp_path, capsys, monkeypatch):
    server, certs, stub = secure
    port = server.address.rsplit(":", 1)[1]
    address = f"localhost:{port}"  # a name in the server certificate
    rollback = ["model", "rollback", "--to", "2", "--address", address]
    tls = ["--ca", str(certs.ca), "--cert", str(certs.other_cert), "--key", str(certs.other_key)]

    assert main(rollback) == 1  # plaintext against a TLS port
    assert "the server refused: UNAVAILABLE" in capsys.readouterr().err
    assert main([*rollback, *tls]) == 1  # a certificate, but no token
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PERMISSION_DENIED" in err[0]
    assert _serving(stub) == 1

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert main([*rollback, *tls, "--token-file", str(token_file)]) == 0
    assert _serving(stub) == 2
    assert "rolled back from v1 to v2" in capsys.readouterr().out

    # The server's own ADMIN_TOKEN is the default credential; --server-name checks the cert.
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)
    by_ip = ["model", "rollback", "--to", "3", "--address", server.address]
    assert main([*by_ip, *tls, "--server-name", "localhost"]) == 0
    assert _serving(stub) == 3
