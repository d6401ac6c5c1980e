"""The README's Python client example (examples/python/client.py) runs as written against real
servers, and ModelClient's answers and refusals are the server's."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import harness
import numpy as np
import pytest
import yaml

from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator import ModelCallError, ModelClient

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_servers(fleet_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    logs = tmp_path_factory.mktemp("client-example")
    servers = [
        # their own feedback stores: the session's four_servers may hold the default ones
        harness.start_server(
            fleet_models,
            name,
            wait=False,
            log_dir=logs,
            env={"FEEDBACK_DATA_DIR": str(logs / "data")},
        )
        for name in ("model_1", "model_2")
    ]
    try:
        for server in servers:
            server.wait_serving()
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_model_client_predicts_and_raises_the_servers_refusal(
    two_servers: list, feature_rows: np.ndarray
) -> None:
    with ModelClient(two_servers[0].address) as model:
        assert model.serving()
        info = model.info()
        assert info.name == "model_1" and len(info.feature_names) == feature_rows.shape[1]
        predictions = model.predict([feature_rows[0], feature_rows[1]])
        assert [p.model_name for p in predictions] == ["model_1", "model_1"]
        assert all(0.0 <= p.probability_up <= 1.0 for p in predictions)
        with pytest.raises(ModelCallError) as refused:
            model.predict([[1.0, 2.0]])
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.reason == "FEATURE_COUNT_MISMATCH"
        ack = model.feedback(predictions[0].prediction_id, underlying_log_return=0.004)
        assert ack.prediction_id == predictions[0].prediction_id and not ack.duplicate
        short = model.feedback(
            predictions[1].prediction_id, side=pb.TRADE_SIDE_SHORT, realized_return=0.01
        )
        assert short.stored_samples == ack.stored_samples + 1
        with pytest.raises(ModelCallError) as unlabelled:
            model.feedback(predictions[1].prediction_id, realized_return=0.01)
        assert unlabelled.value.reason == "MISSING_UNDERLYING_MOVE"
    with ModelClient("127.0.0.1:1", timeout=0.5) as nobody:
        assert not nobody.serving()
        with pytest.raises(ModelCallError) as unreachable:
            nobody.info()
        assert unreachable.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_python_client_example_runs(
    two_servers: list, small_dataset: Path, tmp_path: Path
) -> None:
    config = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    config["model_endpoints"] = [
        {"name": name, "host": "127.0.0.1", "port": server.port, "weight": weight}
        for name, server, weight in zip(
            ("model_1", "model_2"), two_servers, (0.6, 0.4), strict=True
        )
    ]
    config["feedback_queue"]["path"] = str(tmp_path / "feedback.sqlite3")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    candles = sorted(small_dataset.glob("*.zip"))[-1]
    run = subprocess.run(
        [
            sys.executable,
            "examples/python/client.py",
            "--config",
            str(path),
            "--candles",
            str(candles),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("model_1 v1: p_up=") and "signal=SIGNAL_" in lines[0], lines
    assert lines[1] == "refused as expected: INVALID_ARGUMENT FEATURE_COUNT_MISMATCH"
    assert lines[2].startswith("ensemble: ") and "model_1=" in lines[2] and "model_2=" in lines[2]
    assert len(lines) == 3, lines  # nobody missing
