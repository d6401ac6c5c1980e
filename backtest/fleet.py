"""The stack a replay drives: four model servers and the coordinator, real processes on
loopback, every one reading the replay's simulated clock (``CLOCK_FILE``).

The servers serve a copy of the models (the replay's retrains promote new versions there, never
into the trained ``models/``), keep their feedback under the run directory and take the admin
token the coordinator presents when it forwards Feedback. The coordinator runs
``xylen-coordinator serve`` on a config written here: the four endpoints with the project's
default weights, adaptive weights, Feedback forwarded at once (``feedback_delay_seconds: 0``),
and a deadline long enough that no vote goes missing on a loaded machine (a missing vote would
make the figures depend on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import ensemble_service_pb2_grpc as epb_grpc
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server import clock
from xylen_server.devtools.launcher import ServerProcess, start_server

#: The coordinator's static weights (config.example.yaml): LightGBM, XGBoost, CatBoost, LightGBM
#: with a 4-bar horizon.
DEFAULT_WEIGHTS = {"model_1": 0.4, "model_2": 0.3, "model_3": 0.2, "model_4": 0.1}
COORDINATOR_LISTENING = "xylen-coordinator listening on port "


@dataclass
class Fleet:
    """Running servers and coordinator of one replay pass."""

    run_dir: Path
    clock_file: Path
    token: str
    servers: dict[str, ServerProcess]
    coordinator: subprocess.Popen[str]
    coordinator_port: int
    coordinator_log: Path
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    def ensemble(self) -> epb_grpc.EnsembleServiceStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.coordinator_port}")
        self.channels.append(channel)
        return epb_grpc.EnsembleServiceStub(channel)

    def model(self, name: str) -> pb_grpc.ModelServiceStub:
        channel = grpc.insecure_channel(self.servers[name].address)
        self.channels.append(channel)
        return pb_grpc.ModelServiceStub(channel)

    def set_clock(self, ms: int) -> None:
        clock.write(self.clock_file, ms)

    def pids(self) -> dict[str, int]:
        pids = {name: s.proc.pid for name, s in self.servers.items()}
        pids["coordinator"] = self.coordinator.pid
        return pids

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system, their finished children's included: a server's retrain
        jobs) each process has used so far, from /proc; {} where /proc is absent."""
        out = {}
        for name, pid in self.pids().items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
            out[name] = ticks / os.sysconf("SC_CLK_TCK")
        return out

    def stop(self) -> dict[str, int]:
        """SIGTERM to every process (coordinator first); their exit codes."""
        for channel in self.channels:
            channel.close()
        codes = {"coordinator": _stop(self.coordinator)}
        for name, server in self.servers.items():
            codes[name] = server.stop(signal.SIGTERM)
        return codes


def _stop(proc: subprocess.Popen[str], timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def start_fleet(
    models: Path,
    run_dir: Path,
    start_ms: int,
    *,
    names: Sequence[str] = tuple(DEFAULT_WEIGHTS),
    learning: Mapping[str, bool],
    server_env: Mapping[str, str] | None = None,
    forward_feedback: bool = True,
) -> Fleet:
    """Copy ``models`` into ``run_dir``, set the clock to ``start_ms`` and start the servers
    (``learning[name]``: automatic retraining on) and the coordinator."""
    run_dir = run_dir.resolve()
    models = models.resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "models").mkdir(parents=True)
    for name in names:
        shutil.copytree(models / name, run_dir / "models" / name)
    clock_file = run_dir / "clock"
    clock.write(clock_file, start_ms)
    token = secrets.token_urlsafe(24)
    token_file = run_dir / "admin.token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    servers: dict[str, ServerProcess] = {}
    try:
        for name in names:
            env = {
                "CLOCK_FILE": str(clock_file),
                "ADMIN_TOKEN_FILE": str(token_file),
                "FEEDBACK_DATA_DIR": str(run_dir / "data"),
                "METRICS_ENABLED": "false",
                "SESSION_POOL_SIZE": "1",
                "SESSION_THREADS": "1",
                "LOG_LEVEL": "WARNING",
                "RETRAIN_AUTO": "true" if learning.get(name, False) else "false",
                "RETRAIN_THREADS": "1",
                "RETRAIN_MODE": "incremental",
                "MEMORY_TRIM_INTERVAL_SECONDS": "0",
                **dict(server_env or {}),
            }
            servers[name] = start_server(
                run_dir / "models", name, env=env, wait=False, log_dir=run_dir / "logs"
            )
        for server in servers.values():
            server.wait_serving(timeout=180)
        config = coordinator_config(run_dir, servers, token_file, forward_feedback)
        coordinator, port, log_path = _start_coordinator(config, run_dir, clock_file, token_file)
    except BaseException:
        for server in servers.values():
            server.stop(signal.SIGTERM)
        raise
    return Fleet(run_dir, clock_file, token, servers, coordinator, port, log_path)


def coordinator_config(
    run_dir: Path,
    servers: Mapping[str, ServerProcess],
    token_file: Path,
    forward_feedback: bool,
) -> Path:
    raw: dict[str, Any] = {
        "model_endpoints": [
            {
                "name": name,
                "host": "127.0.0.1",
                "port": server.port,
                "weight": DEFAULT_WEIGHTS.get(name, 0.1),
                "enabled": True,
            }
            for name, server in servers.items()
        ],
        "deadline_ms": 60_000,
        "quorum": {"min_weight_fraction": 0.5, "min_votes": 1},
        "thresholds": {"source": "members", "buy": 0.55, "sell": 0.45},
        "weights": {
            "mode": "adaptive",
            "adaptive": {
                "metric": "brier",
                "half_life_outcomes": 50,
                "min_outcomes": 20,
                "floor": 0.25,
                "cap": 2.0,
            },
        },
        "retraining": {
            "enabled": True,
            "send_feedback_to_models": forward_feedback,
            "feedback_delay_seconds": 0,
        },
        "feedback_queue": {
            "path": str(run_dir / "coordinator" / "feedback.sqlite3"),
            "retry_initial_seconds": 0.05,
            "retry_max_seconds": 1,
            "call_timeout_seconds": 60,
        },
        "transport": {"use_stream": False},
        "outlier_detection": {"enabled": False},
        "auth": {"token_file": str(token_file)},
    }
    path = run_dir / "coordinator.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _start_coordinator(
    config: Path, run_dir: Path, clock_file: Path, token_file: Path
) -> tuple[subprocess.Popen[str], int, Path]:
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        CLOCK_FILE=str(clock_file),
        ADMIN_TOKEN_FILE=str(token_file),
        GRPC_HOST="127.0.0.1",
    )
    log_path = run_dir / "logs" / "coordinator.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "xylen_coordinator", "--log-level", "WARNING", "serve"]
    argv += ["--config", str(config), "--port", "0", "--metrics-port", "-1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(COORDINATOR_LISTENING):
        _stop(proc)
        raise RuntimeError(f"coordinator did not start:\n{line}{log_path.read_text()}")
    port = int(line[len(COORDINATOR_LISTENING) :])
    deadline = time.monotonic() + 60
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=max(1.0, deadline - time.monotonic()))
        _wait_voters(epb_grpc.EnsembleServiceStub(channel), deadline)
    except BaseException:
        _stop(proc)
        raise
    finally:
        channel.close()
    return proc, port, log_path


def _wait_voters(stub: epb_grpc.EnsembleServiceStub, deadline: float) -> None:
    """Wait until the coordinator has seen every server SERVING (its health checks run after
    it starts listening): a pass's first Predict before that finds no voter (UNAVAILABLE, "0 of
    4 servers voted ... health not known yet"; seen once in CI on a loaded machine)."""
    waiting: list[str] = []
    while time.monotonic() < deadline:
        info = stub.GetEnsembleInfo(epb.GetEnsembleInfoRequest(), timeout=10)
        waiting = [e.name for e in info.endpoints if e.enabled and not e.serving]
        if info.endpoints and not waiting:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the coordinator never saw {', '.join(waiting) or 'its servers'} SERVING")
