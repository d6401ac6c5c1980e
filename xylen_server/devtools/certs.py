"""``make certs``: a local CA and the certificates the tests, benchmarks and demo use for TLS.

Writes into ``run/certs/`` (or ``--out``), keys readable by their owner only::

    ca.pem ca.key            the local certificate authority (CN xylen-local-ca)
    server.pem server.key    a server certificate: SANs 127.0.0.1, ::1, localhost
    client.pem client.key    a client certificate for mutual TLS: CN and SAN "coordinator"
    other.pem other.key      another client of the same CA: CN and SAN "intruder"

Every certificate is an EC P-256 key signed by the CA with SHA-256, valid from an hour ago for
``--days`` (default 30). For local use only: the CA's key sits beside its certificate.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")
CLIENT_NAME = "coordinator"
OTHER_CLIENT_NAME = "intruder"


@dataclass(frozen=True)
class CertFiles:
    """Where :func:`write_certs` put each file."""

    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def ca(self) -> Path:
        return self.path("ca.pem")

    @property
    def server_cert(self) -> Path:
        return self.path("server.pem")

    @property
    def server_key(self) -> Path:
        return self.path("server.key")

    @property
    def client_cert(self) -> Path:
        return self.path("client.pem")

    @property
    def client_key(self) -> Path:
        return self.path("client.key")

    @property
    def other_cert(self) -> Path:
        return self.path("other.pem")

    @property
    def other_key(self) -> Path:
        return self.path("other.key")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xylen local"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(
    subject: str,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    days: int,
    *,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert, key


def write_certs(
    directory: Path | str, days: int = 30, ca_name: str = "xylen-local-ca"
) -> CertFiles:
    """Write a fresh CA and the server, client and other-client certificates into
    ``directory`` (created); returns where they are."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_subject = _name(ca_name)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = CertFiles(out)
    _write_cert(files.ca, ca_cert)
    _write_key(files.path("ca.key"), ca_key)
    issued = {
        "server": _issue(
            "xylen-server",
            ca_subject,
            ca_key,
            days,
            dns=SERVER_NAMES,
            ips=SERVER_ADDRESSES,
            server=True,
        ),
        "client": _issue(CLIENT_NAME, ca_subject, ca_key, days, dns=(CLIENT_NAME,), server=False),
        "other": _issue(
            OTHER_CLIENT_NAME, ca_subject, ca_key, days, dns=(OTHER_CLIENT_NAME,), server=False
        ),
    }
    for stem, (cert, key) in issued.items():
        _write_cert(files.path(f"{stem}.pem"), cert)
        _write_key(files.path(f"{stem}.key"), key)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make certs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("run/certs"))
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args(argv)
    if args.days < 1:
        print("certs: --days must be at least 1", file=sys.stderr)
        return 2
    files = write_certs(args.out, args.days)
    print(f"wrote a local CA and server/client certificates to {files.directory}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
