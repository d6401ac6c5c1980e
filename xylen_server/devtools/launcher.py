"""Starting and stopping real ``xylen-server`` processes: for the demo, benchmarks and tests.

A server started with ``GRPC_PORT=0`` binds a free port and prints
``xylen-server listening on port N`` on stdout; :func:`start_server` reads it, then waits for
grpc.health.v1 to say SERVING.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.tls import ClientTls, open_channel

LISTENING = "xylen-server listening on port "
METRICS = "xylen-server metrics on port "


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 2.0) -> int:
    """The grpc.health.v1 status of ``service`` ("" is the whole server)."""
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


@dataclass
class ServerProcess:
    """A real ``python -m xylen_server`` process on a loopback port."""

    proc: subprocess.Popen[str]
    port: int
    log_path: Path
    tls: ClientTls | None = None
    """How to dial it when it serves TLS (None: plaintext)."""
    metrics_port: int = 0
    """Port of its ``/metrics`` and ``/health`` (0: metrics off)."""
    host: str = "127.0.0.1"
    """Its ``GRPC_HOST`` (a loopback address; an IPv6 literal is bracketed when dialled)."""

    @property
    def dial_host(self) -> str:
        bare = self.host.strip("[]")
        return f"[{bare}]" if ":" in bare else bare

    @property
    def metrics_url(self) -> str:
        return f"http://{self.dial_host}:{self.metrics_port}"

    @property
    def address(self) -> str:
        return f"{self.dial_host}:{self.port}"

    def channel(self) -> grpc.Channel:
        return open_channel(self.address, self.tls)

    def stub(self, channel: grpc.Channel) -> pb_grpc.ModelServiceStub:
        return pb_grpc.ModelServiceStub(channel)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_serving(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
                try:
                    if (
                        health_status(channel, timeout=1.0)
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"server not SERVING after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code (killing it after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_server(
    model_path: Path,
    model_name: str = "model_1",
    *,
    port: int = 0,
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    log_dir: Path | None = None,
    cwd: Path | None = None,
    tls: ClientTls | None = None,
    preexec: Callable[[], None] | None = None,
) -> ServerProcess:
    """Start a server for ``model_path/model_name`` on 127.0.0.1 (port 0: a free one);
    ``tls`` is how to dial it when ``env`` makes it serve TLS; ``preexec`` runs in the child
    before it executes the server (e.g. joining a cgroup)."""
    full_env = dict(os.environ)
    full_env.update(
        MODEL_PATH=str(model_path),
        MODEL_NAME=model_name,
        GRPC_HOST="127.0.0.1",
        GRPC_PORT=str(port),
        METRICS_PORT="0",
        PYTHONUNBUFFERED="1",
    )
    full_env.setdefault("LOG_LEVEL", "INFO")
    full_env.update(env or {})
    log_dir = log_dir or model_path
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{model_name}-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xylen_server"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=full_env,
            cwd=cwd,
            preexec_fn=preexec,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(LISTENING):
        proc.wait(30)
        raise RuntimeError(
            f"server did not start (exit {proc.returncode}):\n{line}{log_path.read_text()}"
        )
    metrics_port = 0
    if full_env.get("METRICS_ENABLED", "true").lower() not in ("0", "false", "no", "off"):
        metrics_line = proc.stdout.readline()
        if metrics_line.startswith(METRICS):
            metrics_port = int(metrics_line[len(METRICS) :])
    server = ServerProcess(
        proc, int(line[len(LISTENING) :]), log_path, tls, metrics_port, full_env["GRPC_HOST"]
    )
    if wait:
        server.wait_serving()
    return server
