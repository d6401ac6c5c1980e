"""The fixtures of every test, in one place: real data, small real models trained once per
session, and real servers on loopback ports started the way the product starts them.

Model server (``tests/server``): ``candles``, ``feature_rows``, ``models_root`` (one LightGBM
model), and a module-scoped in-process ``server`` with its ``channel`` and ``stub``.
Coordinator (``tests/coordinator``): ``fleet_candles``, ``fleet_models`` (four models of three
types and a spare) and ``four_servers``, real server processes shared by the session (a test
that stops one restarts it on the same port).
Training (``tests/training``): ``real_file`` (a real Binance Vision file, or a clean skip where
``../shared/data/binance-vision`` is absent) and ``small_dataset`` (generated monthly zips).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import harness
import numpy as np
import pytest
from coordinator.helpers import MODELS
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from training.generator import generate
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server import telemetry

# -- model server ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def candles() -> dict[str, np.ndarray]:
    return harness.synthetic_candles()


@pytest.fixture(scope="session")
def feature_rows(candles: dict[str, np.ndarray]) -> np.ndarray:
    return harness.training_rows(candles)[0]


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory, candles: dict[str, np.ndarray]) -> Path:
    root = tmp_path_factory.mktemp("models")
    harness.write_model(root, "model_1", "lightgbm", candles)
    return root


@pytest.fixture(scope="module")
def server(models_root: Path) -> Iterator[harness.InProcessServer]:
    running = harness.InProcessServer(harness.server_settings(models_root))
    yield running
    running.close()


@pytest.fixture(scope="module")
def channel(server: harness.InProcessServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.ModelServiceStub:
    return pb_grpc.ModelServiceStub(channel)


# -- coordinator -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fleet_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coordinator-models")
    for i, (name, kind, _) in enumerate(MODELS, start=1):
        harness.write_model(root, name, kind, trees=30 + 10 * i, seed=i)
    harness.write_model(root, "model_5", "lightgbm", trees=25, seed=5)
    return root


@pytest.fixture(scope="session")
def fleet_candles() -> dict[str, np.ndarray]:
    return harness.synthetic_candles(600, seed=23)


@pytest.fixture(scope="session")
def four_servers(fleet_models: Path) -> Iterator[list[harness.ServerProcess]]:
    """Four real model servers. A test that stops one must restart it on the same port."""
    servers = [
        harness.start_server(fleet_models, name, wait=False, env={"SHUTDOWN_GRACE_SECONDS": "2"})
        for name, _, _ in MODELS
    ]
    try:
        for process in servers:
            process.wait_serving()
        yield servers
    finally:
        for process in servers:
            process.stop()


# -- training ----------------------------------------------------------------------------------


def _real_file(relative: str) -> Path:
    path = harness.SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    return path


@pytest.fixture
def real_file() -> Callable[[str], Path]:
    """``real_file("jamado95__whatever/X.csv")``: the path, or a clean skip when absent."""
    return _real_file


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six monthly 1h zips (2023-01..2023-06, ~4.3k candles) with CHECKSUMs."""
    out = tmp_path_factory.mktemp("klines")
    generate(out, start="2023-01", end="2023-06", seed=11)
    return out


@pytest.fixture
def span_exporter() -> Iterator[InMemorySpanExporter]:
    """Spans of this test, collected in process by the SDK's in-memory exporter (the tracer
    provider is installed for the test and removed after it)."""
    collected = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(collected))
    telemetry.install_tracer_provider(provider)
    try:
        yield collected
    finally:
        telemetry.install_tracer_provider(None)
        provider.shutdown()
