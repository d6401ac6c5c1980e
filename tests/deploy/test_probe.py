"""``python -m xylen_server.probe``, the containers' HEALTHCHECK and ``make status``: exit 0
only for SERVING, 1 for anything else, the status on stdout."""

from __future__ import annotations

import socket
import subprocess
import sys

import harness


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xylen_server.probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_serving_is_exit_0_and_the_default_address_is_grpc_port(
    four_servers: list[harness.ServerProcess],
) -> None:
    server = four_servers[0]
    result = probe(server.address)
    assert (result.returncode, result.stdout.strip()) == (0, f"{server.address} SERVING")
    # as in the image: no argument, GRPC_PORT from the environment
    env = {"GRPC_PORT": str(server.port), "PATH": "/usr/bin:/bin"}
    result = probe(env=env)
    assert (result.returncode, result.stdout.strip()) == (0, f"127.0.0.1:{server.port} SERVING")
    unknown = probe(server.address, "--service", "no.such.Service")
    assert unknown.returncode == 1 and unknown.stdout.strip().endswith("NOT_FOUND")


def test_nothing_listening_is_exit_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = probe(f"127.0.0.1:{port}", "--timeout", "0.5")
    assert (result.returncode, result.stdout.strip()) == (1, f"127.0.0.1:{port} UNREACHABLE")
