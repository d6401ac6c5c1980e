"""End to end: the model directory, determinism, refusals, leakage checks and the CLI."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from training import features as F
from training.__main__ import main
from training.config import ModelSpec, TrainConfig, load_config
from training.evaluate import find_lookahead, shuffled_label_auc
from training.metadata import NATIVE_FILES, ModelMetadata
from training.pipeline import TrainingError, prepare_data, train_model
from training.trainers import make_model

FAST = {"n_estimators": 40, "early_stopping_rounds": 10}


def _config(data: Path, **overrides: object) -> TrainConfig:
    base = {
        "data": str(data),
        "train_start_date": "2023-01-01",
        "train_end_date": "2023-04-15",
        "params": {t: FAST for t in NATIVE_FILES},
    }
    return load_config(overrides={**base, **overrides})


def _tree_digest(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model_dir.iterdir()}


@pytest.mark.parametrize("model_type", list(NATIVE_FILES))
def test_model_directory_and_determinism(
    model_type: str, small_dataset: Path, tmp_path: Path
) -> None:
    config = _config(small_dataset)
    data = prepare_data(config)
    spec = ModelSpec("m", model_type)
    first = train_model(spec, config, data, tmp_path / "a")
    train_model(spec, config, data, tmp_path / "b")
    native = NATIVE_FILES[model_type]
    a, b = tmp_path / "a" / "m", tmp_path / "b" / "m"
    assert (a / native).read_bytes() == (b / native).read_bytes()
    assert {p.name for p in a.iterdir()} >= {native, "metadata.json", "feature_importance.csv"}

    meta = ModelMetadata.read(a)
    assert meta == first and meta.version == 1 and meta.parent_version is None
    assert meta.feature_names == list(F.FEATURE_NAMES)
    assert meta.lookback == F.LOOKBACK_PERIODS
    assert meta.features_hash == F.feature_definitions_hash()
    assert meta.training_samples >= 100 and meta.horizon == 1 and meta.fee == 0.001
    assert len(meta.data["files"]) == 6 and all(len(f["sha256"]) == 64 for f in meta.data["files"])
    # absolute, so a retrain started from any directory finds the history
    assert all(
        Path(f["path"]).is_absolute() and Path(f["path"]).is_file() for f in meta.data["files"]
    )
    for period in ("validation", "test"):
        report = meta.metrics[period]
        assert set(report) == {"model", "majority_class", "previous_return"}
        assert {"accuracy", "precision", "recall", "auc", "log_loss"} <= set(report["model"])
    assert (a / "feature_importance.csv").read_text().startswith("feature,gain,share\n")

    again = train_model(spec, config, data, tmp_path / "a")
    assert (again.version, again.parent_version) == (2, 1)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]


def test_refusals_leave_the_previous_model_intact(small_dataset: Path, tmp_path: Path) -> None:
    config = _config(small_dataset)
    data = prepare_data(config)
    spec = ModelSpec("m", "lightgbm")
    train_model(spec, config, data, tmp_path)
    before = _tree_digest(tmp_path / "m")

    too_few = _config(small_dataset, train_start_date="2023-01-01", train_end_date="2023-01-06")
    with pytest.raises(TrainingError, match="training samples"):
        train_model(spec, too_few, data, tmp_path)
    one_class = _config(small_dataset, threshold=0.5)
    with pytest.raises(TrainingError, match="every training label is 0"):
        train_model(spec, one_class, data, tmp_path)
    with pytest.raises(TrainingError):
        train_model(ModelSpec("new", "xgboost"), one_class, data, tmp_path)

    assert _tree_digest(tmp_path / "m") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_lookahead_detector_catches_a_peeking_feature(small_dataset: Path) -> None:
    config = _config(small_dataset)
    candles = {k: v[:1500] for k, v in prepare_data(config).candles.items()}
    assert find_lookahead(F.compute_features, candles, F.FEATURE_NAMES) == []

    def peeking(c: Mapping[str, np.ndarray]) -> np.ndarray:
        x = F.compute_features(c)
        future = np.append(np.log(c["close"][1:] / c["close"][:-1]), np.nan)  # next bar's return
        return np.column_stack([x, future])

    names = (*F.FEATURE_NAMES, "next_return")
    assert find_lookahead(peeking, candles, names) == ["next_return"]


def test_shuffled_labels_give_chance_auc(small_dataset: Path) -> None:
    config = _config(small_dataset)
    data = prepare_data(config)
    rng = np.random.default_rng(0)
    x = data.features[F.LOOKBACK_PERIODS :]
    y = (x[:, F.FEATURE_NAMES.index("log_return_1")] + rng.normal(0, 0.004, len(x)) > 0) * 1.0
    cut = len(x) // 2

    def fit_predict(xt: np.ndarray, yt: np.ndarray, xs: np.ndarray) -> np.ndarray:
        model = make_model("lightgbm", FAST, feature_names=list(F.FEATURE_NAMES))
        model.fit(xt[: cut // 2], yt[: cut // 2], xt[cut // 2 :], yt[cut // 2 :])
        return model.predict_proba(xs)

    honest = fit_predict(x[:cut], y[:cut], x[cut:])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[cut:], honest) > 0.7  # the signal is learnable ...
    auc = shuffled_label_auc(fit_predict, x[:cut], y[:cut], x[cut:], y[cut:])
    assert abs(auc - 0.5) < 0.06  # ... and gone once the labels are shuffled


def test_cli_generate_and_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["generate", "--out", str(data), "--start", "2023-01", "--end", "2023-06"]) == 0
    assert len(list(data.glob("*.zip.CHECKSUM"))) == 6
    args = ["train", "--data", str(data), "--models-dir", str(tmp_path / "models")]
    args += ["--train-end-date", "2023-04-15", "--only", "model_1", "--only", "model_4"]
    args += ["--set", "params.lightgbm.n_estimators=30"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "model_1: lightgbm v1" in out and "model_4: lightgbm v1 horizon=4" in out
    meta = json.loads((tmp_path / "models" / "model_4" / "metadata.json").read_text())
    assert meta["horizon"] == 4 and meta["params"]["n_estimators"] == 30

    assert main(["train", "--data", str(tmp_path / "missing")]) == 1
    assert "no such file" in capsys.readouterr().err
