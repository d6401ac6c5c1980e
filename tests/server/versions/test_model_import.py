"""``xylen-server model import``: a booster trained elsewhere (the seed's flat
``models/lightgbm_model.txt``, an XGBoost JSON, a CatBoost cbm) becomes a served model with
metadata, checksums and a verified ONNX; one whose features disagree with the server's is
refused with one line and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import REPO, feature_input, start_server
from learning_helpers import learnable_labels

from training import features
from training.metadata import ModelMetadata
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.errors import FailedPrecondition, InvalidArgument
from xylen_server.settings import Settings
from xylen_server.versions.importer import check_booster, import_model

NAMES = list(features.FEATURE_NAMES)


def _cli(*args: str, models: Path, name: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODEL_PATH": str(models), "MODEL_NAME": name, "LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "xylen_server", "model", "import", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _seed_lightgbm(path: Path, x: np.ndarray, y: np.ndarray, names: list[str] | None) -> Path:
    """What the seed's training script leaves: one flat LightGBM text file, no metadata."""
    import lightgbm as lgb

    params = {"objective": "binary", "verbose": -1, "num_leaves": 15, "num_threads": 1}
    dataset = lgb.Dataset(x, y, feature_name=names if names is not None else "auto")
    booster = lgb.train(params, dataset, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(path))
    return path


def test_a_flat_seed_lightgbm_model_is_imported_and_serves(tmp_path: Path, feature_rows):
    import lightgbm as lgb

    x, y = feature_rows[:1500], learnable_labels(feature_rows[:1500])
    seed_file = _seed_lightgbm(tmp_path / "seed" / "models" / "lightgbm_model.txt", x, y, NAMES)
    models = tmp_path / "models"
    started = time.perf_counter()
    done = _cli(str(seed_file), "--horizon", "1", "--symbol", "BTCUSDT", models=models, name="seed")
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert "imported lightgbm model as seed v1" in done.stdout
    assert "25 features defined in training/features.py" in done.stdout
    print(f"import (CLI subprocess, LightGBM 40 trees): {seconds:.2f}s; {done.stdout.strip()}")

    meta = ModelMetadata.read(models / "seed")
    assert meta.feature_names == NAMES and meta.features_hash == features.feature_definitions_hash()
    assert meta.version == 1 and meta.symbol == "BTCUSDT" and meta.data["files"] == []
    assert {"lightgbm_model.txt", "model.onnx", "metadata.json"} <= {
        p.name for p in (models / "seed").iterdir()
    }

    server = start_server(models, "seed")
    try:
        rows = feature_rows[2000:2050]
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            answer = stub.Predict(pb.PredictRequest(inputs=[feature_input(r) for r in rows]))
            info = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info
    finally:
        assert server.stop() == 0
    served = np.array([p.probability_up for p in answer.predictions])
    expected = lgb.Booster(model_file=str(seed_file)).predict(rows)
    assert np.abs(served - expected).max() < 1e-5
    assert info.name == "seed" and info.version == 1


@pytest.mark.parametrize(
    ("case", "names", "message"),
    [
        ("unnamed", None, "trained without feature names"),
        ("foreign", ["close_price", *NAMES[1:]], "1 of its 25 features are not defined"),
    ],
)
def test_a_booster_with_other_features_is_refused(
    tmp_path: Path, feature_rows, case, names, message
):
    x = feature_rows[:600]
    seed_file = _seed_lightgbm(tmp_path / f"{case}.txt", x, learnable_labels(x), names)
    models = tmp_path / "models"
    done = _cli(str(seed_file), models=models, name="model_x")
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("xylen-server: error: feature mismatch: ") and message in line
    assert len(line) < 400
    assert not (models / "model_x").exists()
    assert not list(models.glob(".import-*"))


def test_a_feature_named_twice_or_a_lookback_too_short_is_refused():
    for names, lookback, message in [
        ([NAMES[0], NAMES[0], *NAMES[2:]], features.LOOKBACK_PERIODS, "names a feature twice"),
        (NAMES, 3, "LOOKBACK_PERIODS=3 is shorter than the chosen features need"),
    ]:
        with pytest.raises(InvalidArgument) as refused:
            check_booster("lightgbm", names, "binary", lookback)
        assert refused.value.reason == "FEATURE_MISMATCH" and message in refused.value.message


def test_a_subset_in_another_order_is_imported_with_its_own_selection(tmp_path: Path, feature_rows):
    """The seed's FEATURES: any selection and order of the defined features serves, with the
    lookback given; the metadata records the selection and its definitions hash."""
    import lightgbm as lgb

    picked = [7, 0, 3, 12, 1]
    names = [NAMES[i] for i in picked]
    x = np.ascontiguousarray(feature_rows[:1500][:, picked])
    source = _seed_lightgbm(tmp_path / "subset.txt", x, learnable_labels(x), names)
    settings = Settings(model_path=tmp_path / "models", model_name="subset")
    imported = import_model(source, settings, lookback=features.LOOKBACK_PERIODS)
    meta = ModelMetadata.read(imported.model_dir)
    selection = features.FeatureSet.of(names, features.LOOKBACK_PERIODS)
    assert meta.feature_names == names and meta.features_hash == selection.definitions_hash()

    from xylen_server.serving.model_store import load_model

    rows = np.ascontiguousarray(feature_rows[2000:2050][:, picked])
    loaded = load_model(settings)
    try:
        served = np.asarray(loaded.engine.predict_proba(rows))
    finally:
        loaded.close()
    assert np.abs(served - lgb.Booster(model_file=str(source)).predict(rows)).max() < 1e-5


@pytest.mark.parametrize("model_type", ["xgboost", "catboost"])
def test_xgboost_json_and_catboost_cbm_are_imported_with_parity(
    tmp_path: Path, feature_rows, model_type
):
    x, y = feature_rows[:1500], learnable_labels(feature_rows[:1500])
    if model_type == "xgboost":
        import xgboost as xgb

        source = tmp_path / "outside.json"
        booster = xgb.train(
            {"objective": "binary:logistic", "max_depth": 4, "nthread": 1},
            xgb.DMatrix(x, label=y, feature_names=NAMES),
            40,
        )
        booster.save_model(str(source))
        expected = booster.predict(xgb.DMatrix(feature_rows[2000:2050], feature_names=NAMES))
    else:
        from catboost import CatBoostClassifier, Pool

        source = tmp_path / "outside.cbm"
        model = CatBoostClassifier(
            iterations=40, depth=4, verbose=0, thread_count=1, allow_writing_files=False
        )
        model.fit(Pool(x, y, feature_names=NAMES))
        model.save_model(str(source))
        expected = model.predict_proba(feature_rows[2000:2050])[:, 1]
    settings = Settings(model_path=tmp_path / "models", model_name=f"ext_{model_type}")
    imported = import_model(source, settings, horizon=4, fee=0.0005)
    assert imported.parity_max_difference is not None
    assert imported.parity_max_difference <= 1e-5
    meta = ModelMetadata.read(imported.model_dir)
    assert (meta.model_type, meta.horizon, meta.fee) == (model_type, 4, 0.0005)
    print(f"import ({model_type} 40 trees, in-process): {imported.seconds}")

    from xylen_server.serving.model_store import load_model

    loaded = load_model(settings)
    try:
        served = loaded.engine.predict_proba(feature_rows[2000:2050])
    finally:
        loaded.close()
    assert np.abs(np.asarray(served) - expected).max() < 1e-5

    with pytest.raises(FailedPrecondition, match="exists already"):
        import_model(source, settings)


def test_a_regression_booster_is_refused(tmp_path: Path, feature_rows):
    import lightgbm as lgb

    x = feature_rows[:400]
    booster = lgb.train(
        {"objective": "regression", "verbose": -1, "num_threads": 1},
        lgb.Dataset(x.copy(), x[:, 0].copy(), feature_name=NAMES),
        10,
    )
    source = tmp_path / "regression.txt"
    booster.save_model(str(source))
    with pytest.raises(InvalidArgument) as refused:
        import_model(source, Settings(model_path=tmp_path / "models", model_name="r"))
    assert refused.value.reason == "NOT_A_BINARY_CLASSIFIER"
