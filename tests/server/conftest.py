"""Fixtures for the model-server tests: one small real model per session, real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import InProcessServer, server_settings, synthetic_candles, training_rows, write_model

from xylen.v1 import model_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="session")
def candles() -> dict[str, np.ndarray]:
    return synthetic_candles()


@pytest.fixture(scope="session")
def feature_rows(candles: dict[str, np.ndarray]) -> np.ndarray:
    return training_rows(candles)[0]


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory, candles: dict[str, np.ndarray]) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_model(root, "model_1", "lightgbm", candles)
    return root


@pytest.fixture(scope="module")
def server(models_root: Path) -> Iterator[InProcessServer]:
    running = InProcessServer(server_settings(models_root))
    yield running
    running.close()


@pytest.fixture(scope="module")
def channel(server: InProcessServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.ModelServiceStub:
    return pb_grpc.ModelServiceStub(channel)
