"""The models `make train` writes are the models the server loads: all four default models,
three model types, through the real training CLI and the real loader."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from harness import InProcessServer, feature_input, server_settings, window_input

from training.__main__ import main as training_main
from training.metadata import PARITY_TOLERANCE, ModelMetadata
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_coordinator.candles import read_candles

MODEL_TYPES = {
    "model_1": "lightgbm",
    "model_2": "xgboost",
    "model_3": "catboost",
    "model_4": "lightgbm",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trained")
    data, models = root / "data", root / "models"
    assert (
        training_main(["generate", "--out", str(data), "--start", "2023-01", "--end", "2023-08"])
        == 0
    )
    assert (
        training_main(
            [
                "train",
                "--data",
                str(data),
                "--models-dir",
                str(models),
                "--train-end-date",
                "2023-05-15",
            ]
        )
        == 0
    )
    return data, models


@pytest.mark.parametrize("name", list(MODEL_TYPES))
def test_every_default_model_serves(trained, name):
    data, models = trained
    meta = ModelMetadata.read(models / name)
    assert meta.model_type == MODEL_TYPES[name]
    assert meta.checksums and (models / name / "model.onnx").exists()
    server = InProcessServer(server_settings(models, model_name=name))
    try:
        assert server.model.parity_max_difference is not None
        assert server.model.parity_max_difference <= PARITY_TOLERANCE
        candles = read_candles(data)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info
            assert (info.name, info.version, info.horizon) == (name, 1, meta.horizon)
            answer = stub.Predict(pb.PredictRequest(inputs=[window_input(candles, 3000)]))
            p = answer.predictions[0].probability_up
            assert 0.0 < p < 1.0
            # The same row as a feature vector gives the same answer.
            from training import features

            row = features.compute_features(candles)[3000]
            again = stub.Predict(pb.PredictRequest(inputs=[feature_input(row)]))
            assert again.predictions[0].probability_up == p
    finally:
        server.close()
