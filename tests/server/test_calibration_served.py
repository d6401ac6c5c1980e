"""Calibration served: a model trained by the pipeline carries its Platt map in its metadata,
GetModelInfo shows it, every served ``probability_up`` is ``calibrate(raw_probability_up)`` with
the raw value equal to the native booster's, the signal follows the calibrated probability, and
a model trained before calibration is served with the identity."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import harness
import numpy as np
import pytest

from training import features as F
from training.calibration import apply as calibrate
from training.config import load_config
from training.metadata import NATIVE_FILES, ModelMetadata
from training.pipeline import prepare_data, train_model
from training.trainers import MODEL_CLASSES
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.signals import signal_for


@pytest.fixture(scope="module")
def trained(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("calibrated")
    config = load_config(
        overrides={
            "data": str(small_dataset),
            "params": {t: {"n_estimators": 60, "early_stopping_rounds": 15} for t in NATIVE_FILES},
            "models": [{"name": "cal"}],
        },
        environ={},
    )
    data = prepare_data(config)
    train_model(config.models[0], config, data, root)
    return root


@pytest.fixture(scope="module")
def stub(trained: Path) -> Iterator[pb_grpc.ModelServiceStub]:
    server = harness.InProcessServer(harness.server_settings(trained, model_name="cal"))
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ModelServiceStub(channel)
    server.close()


def test_training_writes_a_platt_map_and_its_figures(trained: Path) -> None:
    meta = ModelMetadata.read(trained / "cal")
    cal = meta.calibration
    assert cal["method"] == "platt" and cal["a"] > 0
    assert cal["validation"]["samples"] > 0
    test = meta.metrics["calibration"]["test"]
    for key in ("brier_raw", "brier_calibrated", "ece_raw", "ece_calibrated"):
        assert 0 <= test[key] <= 1
    # Fitted on validation, so on validation the calibrated Brier score cannot be worse.
    valid = meta.metrics["calibration"]["validation"]
    assert valid["brier_calibrated"] <= valid["brier_raw"] + 1e-12


def test_served_probability_is_the_calibrated_raw_one(
    trained: Path, stub: pb_grpc.ModelServiceStub, candles: dict[str, np.ndarray]
) -> None:
    meta = ModelMetadata.read(trained / "cal")
    info = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info
    assert info.calibration_method == "platt"
    assert (info.calibration_a, info.calibration_b) == (
        meta.calibration["a"],
        meta.calibration["b"],
    )

    ends = list(range(150, 3000, 11))
    answer = stub.Predict(
        pb.PredictRequest(inputs=[harness.window_input(candles, e) for e in ends])
    )
    raw = np.array([p.raw_probability_up for p in answer.predictions])
    served = np.array([p.probability_up for p in answer.predictions])
    assert np.array_equal(served, calibrate(meta.calibration, raw))
    assert not np.allclose(served, raw, atol=1e-3), "the calibration changes the numbers"
    # The raw value is the engine's, the same as the native booster on the training features.
    offline = F.compute_features(candles)[ends].astype(np.float32)
    native = MODEL_CLASSES["lightgbm"].load(trained / "cal", list(meta.feature_names))
    assert raw.tolist() == pytest.approx(native.predict_proba(offline).tolist(), abs=1e-5)
    buy, sell = info.buy_threshold, info.sell_threshold
    for p in answer.predictions:
        assert p.signal == signal_for(p.probability_up, buy, sell).proto


def test_a_model_without_calibration_is_served_with_the_identity(tmp_path: Path) -> None:
    harness.write_model(tmp_path, "old", trees=10)  # metadata as written before calibration
    assert ModelMetadata.read(tmp_path / "old").calibration == {}
    server = harness.InProcessServer(harness.server_settings(tmp_path, model_name="old"))
    try:
        with grpc.insecure_channel(server.address) as channel:
            old = pb_grpc.ModelServiceStub(channel)
            info = old.GetModelInfo(pb.GetModelInfoRequest()).model_info
            rows = F.compute_features(harness.synthetic_candles(400, seed=4))[-20:]
            answer = old.Predict(pb.PredictRequest(inputs=[harness.feature_input(r) for r in rows]))
    finally:
        server.close()
    assert (info.calibration_method, info.calibration_a, info.calibration_b) == ("identity", 1, 0)
    assert all(p.probability_up == p.raw_probability_up for p in answer.predictions)
