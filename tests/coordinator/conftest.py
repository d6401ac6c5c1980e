"""Coordinator fixtures: small real models trained once per session and four real server
processes shared by the tests (a test that stops one restarts it on the same port)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import harness
import numpy as np
import pytest
from coordinator.helpers import MODELS


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coordinator-models")
    for i, (name, kind, _) in enumerate(MODELS, start=1):
        harness.write_model(root, name, kind, trees=30 + 10 * i, seed=i)
    harness.write_model(root, "model_5", "lightgbm", trees=25, seed=5)
    return root


@pytest.fixture(scope="session")
def candles() -> dict[str, np.ndarray]:
    return harness.synthetic_candles(600, seed=23)


@pytest.fixture(scope="session")
def four_servers(models_root: Path) -> Iterator[list[harness.ServerProcess]]:
    """Four real model servers. A test that stops one must restart it on the same port."""
    servers = [
        harness.start_server(models_root, name, wait=False, env={"SHUTDOWN_GRACE_SECONDS": "2"})
        for name, _, _ in MODELS
    ]
    try:
        for server in servers:
            server.wait_serving()
        yield servers
    finally:
        for server in servers:
            server.stop()
