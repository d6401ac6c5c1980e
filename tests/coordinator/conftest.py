"""Fixtures the coordinator's tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from coordinator.coordinator_process import CoordinatorProcess
from coordinator.recording_model_server import RecordingModelServer


@pytest.fixture
def recorders() -> Iterator[list[RecordingModelServer]]:
    """Two recording model servers: ``up`` voting 0.9 and ``down`` voting 0.3."""
    servers = [RecordingModelServer("up", 0.9), RecordingModelServer("down", 0.3)]
    yield servers
    for server in servers:
        server.close()


@pytest.fixture
def coordinator_factory(tmp_path: Path) -> Iterator[Callable[[Path], CoordinatorProcess]]:
    """Starts `xylen-coordinator serve` processes on config files; kills any still running at
    the test's end."""
    started: list[CoordinatorProcess] = []

    def start(config: Path) -> CoordinatorProcess:
        process = CoordinatorProcess(config, tmp_path / f"coordinator-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
