"""Fixtures the coordinator's tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from coordinator.recording_model_server import RecordingModelServer


@pytest.fixture
def recorders() -> Iterator[list[RecordingModelServer]]:
    """Two recording model servers: ``up`` voting 0.9 and ``down`` voting 0.3."""
    servers = [RecordingModelServer("up", 0.9), RecordingModelServer("down", 0.3)]
    yield servers
    for server in servers:
        server.close()
