"""ONNX against native: the conversion must be exact on tens of thousands of real rows,
including values sitting exactly on split thresholds, for every model type."""

from __future__ import annotations

import dataclasses

import lightgbm as lgb
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from harness import (
    SHARED_DATA,
    InProcessServer,
    feature_input,
    server_settings,
    synthetic_candles,
    training_rows,
    write_model,
)
from onnxmltools import convert_lightgbm
from onnxmltools.convert.common.data_types import FloatTensorType

from training import features
from training.metadata import PARITY_TOLERANCE, ModelMetadata, sha256_file
from training.onnx_export import (
    CONVERTER_VERSION,
    CONVERTER_VERSION_KEY,
    NATIVE_SHA256_KEY,
    export_onnx,
)
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.errors import ModelLoadError
from xylen_server.serving.model_store import load_model
from xylen_server.serving.parity import probe_rows

REAL_1H = [
    "BTCUSDT-1h-2018-01.csv",
    "BTCUSDT-1h-2023-01.csv",
    "BTCUSDT-1h-2024-01.csv",
    "BTCUSDT-1h-2025-01.csv",
]


@pytest.fixture(scope="module")
def real_candles() -> dict[str, np.ndarray]:
    """Four years of real BTCUSDT 1h candles (about 35k rows) when the shared data is here,
    else the same amount of generated candles."""
    folder = SHARED_DATA / "jamado95__whatever"
    if folder.is_dir():
        from training.klines import load_klines

        frames = [load_klines(folder / name).frame for name in REAL_1H]
        return features.candles_from_frame(__import__("polars").concat(frames))
    return synthetic_candles(n=35_000, seed=5)


@pytest.fixture(scope="module")
def big_lightgbm(tmp_path_factory, real_candles):
    """A 500-tree LightGBM model on real features, written like training writes it."""
    root = tmp_path_factory.mktemp("parity")
    x, y = training_rows(real_candles)
    assert len(x) > 30_000
    params = {"objective": "binary", "verbose": -1, "num_leaves": 31, "seed": 3, "num_threads": 2}
    booster = lgb.train(params, lgb.Dataset(x, y), 500)
    model_dir = root / "model_1"
    model_dir.mkdir()
    booster.save_model(str(model_dir / "lightgbm_model.txt"))
    ModelMetadata(
        name="model_1",
        model_type="lightgbm",
        version=1,
        training_samples=len(y),
        trained_at="2026-11-30T00:00:00Z",
        feature_names=list(features.FEATURE_NAMES),
        lookback=features.LOOKBACK_PERIODS,
        features_hash=features.feature_definitions_hash(),
    ).write(model_dir)
    return model_dir, booster, x


def _onnx_probabilities(model: onnx.ModelProto, rows: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": rows})[0][:, 1]


def test_lightgbm_conversion_is_exact_on_real_rows_and_threshold_values(big_lightgbm):
    model_dir, booster, rows = big_lightgbm
    model = onnx.load(str(export_onnx(model_dir)))
    probes = probe_rows(model, rows.shape[1], 20_000, seed=1)
    data = np.vstack([rows, probes])
    difference = np.abs(booster.predict(data) - _onnx_probabilities(model, data))
    assert difference.max() <= PARITY_TOLERANCE, difference.max()


def test_the_naive_conversion_fails_the_same_check(big_lightgbm):
    """Proves the check has teeth: without rounding thresholds down, splits flip."""
    _, booster, rows = big_lightgbm
    naive = convert_lightgbm(
        booster,
        initial_types=[("input", FloatTensorType([None, rows.shape[1]]))],
        zipmap=False,
        target_opset=15,
    )
    probes = probe_rows(naive, rows.shape[1], 20_000, seed=1)
    difference = np.abs(booster.predict(probes) - _onnx_probabilities(naive, probes))
    assert difference.max() > PARITY_TOLERANCE


def test_the_server_refuses_an_onnx_file_that_disagrees(big_lightgbm, tmp_path):
    model_dir, booster, rows = big_lightgbm
    bad_dir = tmp_path / "model_1"
    bad_dir.mkdir()
    for name in ("lightgbm_model.txt", "metadata.json"):
        (bad_dir / name).write_bytes((model_dir / name).read_bytes())
    naive = convert_lightgbm(
        booster,
        initial_types=[("input", FloatTensorType([None, rows.shape[1]]))],
        zipmap=False,
        target_opset=15,
    )
    # Stamp it as converted from this very file so it is taken as current.
    onnx.helper.set_model_props(
        naive,
        {
            NATIVE_SHA256_KEY: sha256_file(bad_dir / "lightgbm_model.txt"),
            CONVERTER_VERSION_KEY: CONVERTER_VERSION,
        },
    )
    onnx.save(naive, str(bad_dir / "model.onnx"))
    with pytest.raises(ModelLoadError, match=r"differ by .* refusing to serve"):
        load_model(server_settings(tmp_path))


@pytest.mark.parametrize("model_type", ["xgboost", "catboost"])
def test_xgboost_and_catboost_load_through_the_same_path(tmp_path, real_candles, model_type):
    model_dir = write_model(tmp_path, "model_1", model_type, real_candles, trees=150)
    model = load_model(server_settings(tmp_path))
    try:
        assert model.meta.model_type == model_type
        assert model.parity_max_difference is not None
        assert model.parity_max_difference <= PARITY_TOLERANCE
        # And on every real row, not just the probe.
        rows = training_rows(real_candles)[0]
        native = load_model(server_settings(tmp_path, onnx_enabled=False))
        try:
            diff = np.abs(native.engine.predict_proba(rows) - model.engine.predict_proba(rows))
            assert diff.max() <= PARITY_TOLERANCE
        finally:
            native.close()
        assert (model_dir / "model.onnx").exists()
    finally:
        model.close()


def test_native_engine_serves_the_same_answers_as_onnx(models_root, feature_rows):
    onnx_server = InProcessServer(server_settings(models_root))
    native_server = InProcessServer(server_settings(models_root, onnx_enabled=False))
    try:
        request = pb.PredictRequest(inputs=[feature_input(r) for r in feature_rows[:200]])
        answers = {}
        for name, server in (("onnx", onnx_server), ("native", native_server)):
            import grpc

            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.ModelServiceStub(channel)
                answers[name] = np.array(
                    [p.probability_up for p in stub.Predict(request).predictions]
                )
                engine = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info.engine
                assert engine == (pb.ENGINE_ONNX if name == "onnx" else pb.ENGINE_NATIVE)
        assert np.abs(answers["onnx"] - answers["native"]).max() <= PARITY_TOLERANCE
        # Single rows take LightGBM's fast path; batches take Booster.predict: both agree.
        single = [
            native_server.model.engine.predict_proba(feature_rows[i : i + 1])[0] for i in range(50)
        ]
        np.testing.assert_allclose(
            single, native_server.model.engine.predict_proba(feature_rows[:50]), atol=1e-12
        )
    finally:
        onnx_server.close()
        native_server.close()


def test_metadata_round_trips(big_lightgbm):
    model_dir, _, _ = big_lightgbm
    meta = ModelMetadata.read(model_dir)
    assert ModelMetadata.from_dict(dataclasses.asdict(meta)) == meta
