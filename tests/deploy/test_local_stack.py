"""``make up`` / ``status`` / ``down``: the compose stack as local processes, for real.

The stack runs through its command line (as the Makefile does), on free ports mapped from the
compose ones so it never meets another test's servers; ensemble calls go through its
coordinator; one server is killed with SIGKILL, the ensemble carries on without it, ``up``
restarts just that one; ``down`` leaves no process and no port behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import harness
import numpy as np
import pytest
import yaml
from metrics_page import PROMETHEUS_TEXT, families, fetch

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import ensemble_service_pb2_grpc as epb_grpc
from xylen_server.devtools.stack import alive

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PORTS = [8001, 8002, 8003, 8004, 9001, 9002, 9003, 9004, 50051, 9000, 9090]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_is_free(port: int) -> bool:
    """Nothing listens on it (SO_REUSEADDR, as servers bind: closed connections in TIME_WAIT
    do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class StackCli:
    def __init__(self, run_dir: Path, models: Path, port_map: dict[int, int]) -> None:
        self.run_dir, self.models, self.port_map = run_dir, models, port_map

    def __call__(self, command: str) -> subprocess.CompletedProcess[str]:
        mapping = ",".join(f"{a}={b}" for a, b in self.port_map.items())
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "xylen_server.devtools.stack",
                command,
                "--run-dir",
                str(self.run_dir),
                "--models",
                str(self.models),
                "--no-prometheus",
                "--timeout",
                "240",
                # only up is told the ports: status and down use the ones it kept
                *(["--port-map", mapping] if command == "up" else []),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=400,
        )

    def pids(self) -> dict[str, int]:
        return dict(json.loads((self.run_dir / "stack.json").read_text())["pids"])


@pytest.fixture
def stack(tmp_path: Path, fleet_models: Path) -> Iterator[StackCli]:
    models = tmp_path / "models"
    for i in range(1, 5):
        shutil.copytree(fleet_models / f"model_{i}", models / f"model_{i}")
    cli = StackCli(tmp_path / "run", models, dict(zip(COMPOSE_PORTS, free_ports(11), strict=True)))
    try:
        yield cli
    finally:
        cli("down")


@pytest.mark.slow
def test_up_serves_the_ensemble_survives_a_kill_restarts_and_down_leaves_nothing(
    stack: StackCli, fleet_candles: dict[str, np.ndarray]
) -> None:
    up = stack("up")
    assert up.returncode == 0, up.stdout + up.stderr
    coordinator_port = stack.port_map[50051]
    for i in range(1, 5):
        assert f"gRPC 127.0.0.1:{stack.port_map[8000 + i]}" in up.stdout, up.stdout
    assert "coordinator      pid" in up.stdout and f"127.0.0.1:{coordinator_port}" in up.stdout
    # metrics where compose.yaml's Prometheus scrapes them: 900N for servers, 9000 coordinator
    for port in (stack.port_map[9000], stack.port_map[9002]):
        assert f"metrics 127.0.0.1:{port}" in up.stdout, up.stdout
        page = families(fetch(port, content_type=PROMETHEUS_TEXT))  # 200, the text format
        assert any(family.type != "unknown" for family in page.values()), list(page)

    # the same environment as compose: deploy/xylen.env and the per-service variables
    pids = stack.pids()
    environ = Path(f"/proc/{pids['model-server-2']}/environ").read_bytes().split(b"\0")
    assert b"MODEL_NAME=model_2" in environ and b"SESSION_POOL_SIZE=1" in environ
    assert f"GRPC_PORT={stack.port_map[8002]}".encode() in environ
    config = yaml.safe_load((stack.run_dir / "coordinator.yaml").read_text())
    assert [(e["name"], e["port"]) for e in config["model_endpoints"]] == [
        (f"model_{i}", stack.port_map[8000 + i]) for i in range(1, 5)
    ]

    status = stack("status")
    assert status.returncode == 0, status.stdout
    assert status.stdout.count("SERVING") == 5, status.stdout

    request = epb.EnsembleServicePredictRequest(
        inputs=[harness.window_input(fleet_candles, end) for end in (300, 400, 500)]
    )
    with grpc.insecure_channel(f"127.0.0.1:{coordinator_port}") as channel:
        ensemble = epb_grpc.EnsembleServiceStub(channel)
        response = ensemble.Predict(request, timeout=30)
        assert len(response.predictions) == 3 and not response.missing_votes
        assert sorted(v.server_name for v in response.predictions[0].votes) == [
            f"model_{i}" for i in range(1, 5)
        ]

        # kill -9 one server: the ensemble carries on with three and names the missing one
        os.kill(pids["model-server-3"], signal.SIGKILL)
        while alive(pids["model-server-3"]):
            time.sleep(0.05)
        status = stack("status")
        assert status.returncode == 3 and "STOPPED" in status.stdout, status.stdout
        deadline = time.monotonic() + 30
        while True:
            response = ensemble.Predict(request, timeout=30)
            missing = [m.server_name for m in response.missing_votes]
            if missing == ["model_3"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert missing == ["model_3"], response
        assert len(response.predictions) == 3
        assert len(response.predictions[0].votes) == 3

        # `up` again restarts only the missing server
        again = stack("up")
        assert again.returncode == 0, again.stdout + again.stderr
        restarted = stack.pids()
        assert restarted["model-server-3"] != pids["model-server-3"]
        assert {k: v for k, v in restarted.items() if k != "model-server-3"} == {
            k: v for k, v in pids.items() if k != "model-server-3"
        }
        deadline = time.monotonic() + 30
        while True:
            response = ensemble.Predict(request, timeout=30)
            if not response.missing_votes or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not response.missing_votes, response.missing_votes
        assert len(response.predictions[0].votes) == 4

    down = stack("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(alive(pid) for pid in restarted.values())
    assert all(port_is_free(port) for port in stack.port_map.values())
    assert not (stack.run_dir / "stack.json").exists()
    for name in restarted:
        assert (stack.run_dir / f"{name}.log").exists()
    status = stack("status")
    assert status.returncode == 3 and status.stdout.count("STOPPED") == 5, status.stdout
