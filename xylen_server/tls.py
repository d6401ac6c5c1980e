"""TLS credentials from PEM files, for both servers and every client of them.

Server side (:func:`server_credentials`): ``TLS_CERT_FILE`` and ``TLS_KEY_FILE`` turn a gRPC port
into TLS; ``TLS_CLIENT_CA_FILE`` makes it mutual (a client must present a certificate that CA
signed, or the handshake fails). Client side (:class:`ClientTls`): the CA that signed the
servers, optionally a client certificate and key (mTLS), and a server-name override for a
certificate whose names differ from the address dialled. :func:`open_channel` and
:func:`open_aio_channel` build a plaintext or TLS channel from the same options, so the
coordinator, the Python client, the CLI, the tests and the benchmarks dial alike.

A file that cannot be read, or a key without its certificate, is a
:class:`~xylen_server.errors.SettingsError` naming the variable: the process stops at start
with one line (exit 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from xylen_server.errors import SettingsError

MAX_PEM_BYTES = 1024 * 1024
"""Largest certificate, key or CA file read (a PEM bundle is a few KB)."""


def read_pem(path: Path | str, what: str) -> bytes:
    """The bytes of the PEM file ``path``; SettingsError naming ``what`` if it is unreadable,
    empty, too large or not PEM."""
    path = Path(path)
    try:
        if not path.is_file():
            raise SettingsError(f"{what}: {path} is not a readable file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise SettingsError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise SettingsError(f"{what}: {path} is larger than {MAX_PEM_BYTES} bytes")
    if b"-----BEGIN " not in data:
        raise SettingsError(f"{what}: {path} holds no PEM block")
    return data


def server_credentials(
    cert_file: Path | None, key_file: Path | None, client_ca_file: Path | None = None
) -> grpc.ServerCredentials | None:
    """TLS credentials for a server port (None: plaintext). With ``client_ca_file`` the port
    requires and verifies a client certificate signed by that CA (mutual TLS)."""
    if cert_file is None and key_file is None:
        if client_ca_file is not None:
            raise SettingsError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
        return None
    if cert_file is None or key_file is None:
        raise SettingsError("TLS_CERT_FILE and TLS_KEY_FILE go together: set both or neither")
    pair = (read_pem(key_file, "TLS_KEY_FILE"), read_pem(cert_file, "TLS_CERT_FILE"))
    if client_ca_file is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=read_pem(client_ca_file, "TLS_CLIENT_CA_FILE"),
        require_client_auth=True,
    )


@dataclass(frozen=True)
class ClientTls:
    """How a client dials a TLS server: ``ca`` verifies the server; ``cert`` and ``key`` are
    this client's own certificate for mutual TLS; ``server_name`` overrides the name checked
    against the server's certificate (default: the host dialled)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials (SettingsError naming a file that cannot be used)."""
        if (self.cert is None) != (self.key is None):
            raise SettingsError("a client certificate and its key go together: give both")
        root = read_pem(self.ca, "TLS CA") if self.ca is not None else None
        key = read_pem(self.key, "TLS client key") if self.key is not None else None
        cert = read_pem(self.cert, "TLS client certificate") if self.cert is not None else None
        return grpc.ssl_channel_credentials(
            root_certificates=root, private_key=key, certificate_chain=cert
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options: the server-name override, if any."""
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def open_channel(
    address: str, tls: ClientTls | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking channel to ``address``: plaintext when ``tls`` is None, else TLS."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.credentials(), options=[*options, *tls.options()])


def open_aio_channel(
    address: str, tls: ClientTls | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: plaintext when ``tls`` is None, else TLS."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, tls.credentials(), options=[*options, *tls.options()])


def add_client_arguments(parser: Any) -> None:
    """The options every command that dials a server takes (``argparse``): ``--ca``, ``--cert``,
    ``--key``, ``--server-name`` and ``--token-file``."""
    group = parser.add_argument_group("connection (TLS and credentials)")
    group.add_argument("--ca", type=Path, help="PEM CA that signed the server's certificate: TLS")
    group.add_argument("--cert", type=Path, help="PEM client certificate (mutual TLS)")
    group.add_argument("--key", type=Path, help="PEM key of --cert")
    group.add_argument("--server-name", default="", help="name to check the server's cert for")
    group.add_argument(
        "--token-file",
        type=Path,
        help="file holding the admin bearer token (default: ADMIN_TOKEN / ADMIN_TOKEN_FILE)",
    )


def client_from_arguments(args: Any) -> ClientTls | None:
    """The :class:`ClientTls` of :func:`add_client_arguments`' options (None: plaintext)."""
    if args.ca is None and args.cert is None and args.key is None:
        return None
    return ClientTls(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)
