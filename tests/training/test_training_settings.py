"""LOOKBACK_PERIODS, FEATURES and the split dates from default.yaml, the environment, --set and
``make train VAR=...`` alike; the split by fraction when no dates are given; thresholds and the
per-model report in the metadata and on stdout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import harness
import numpy as np
import pytest

from training import features as F
from training.config import ConfigError, ModelSpec, load_config
from training.generator import generate
from training.metadata import NATIVE_FILES, ModelMetadata
from training.pipeline import prepare_data, train_model
from training.thresholds import RULE

SUBSET = ["realized_vol_60", "log_return_1", "rsi_14", "taker_buy_ratio_20", "time_of_day"]
FAST = "{n_estimators: 40, early_stopping_rounds: 10}"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOOKBACK_PERIODS", "FEATURES")}
    env.update(extra)
    return env


def test_environment_between_the_file_and_set() -> None:
    environ = {"LOOKBACK_PERIODS": "61", "FEATURES": ",".join(SUBSET)}
    config = load_config(environ=environ)
    selection = config.feature_set(config.models[0])
    assert (selection.names, selection.lookback) == (tuple(SUBSET), 61)
    assert config.train_start_date is None and config.train_end_date is None  # fraction split
    over = load_config(overrides={"lookback_periods": 70}, environ=environ)
    assert over.feature_set(over.models[0]).lookback == 70
    dated = load_config(environ={"TRAIN_START_DATE": "2025-02-01", "TRAIN_END_DATE": "2025-06-30"})
    assert (dated.train_start_date, dated.train_end_date) == ("2025-02-01", "2025-06-30")
    # A model's own keys win over the shared ones.
    spec = ModelSpec("m", lookback_periods=100, features=list(F.FEATURE_NAMES))
    assert config.feature_set(spec).is_default


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"FEATURES": "log_return_1,no_such_feature"}, "unknown features 'no_such_feature'"),
        ({"LOOKBACK_PERIODS": "60"}, "LOOKBACK_PERIODS=60 is shorter than the chosen features"),
        ({"FEATURES": "rsi_14,rsi_14"}, "names a feature twice"),
        ({"LOOKBACK_PERIODS": "many"}, "LOOKBACK_PERIODS must be a whole number of candles"),
    ],
)
def test_bad_settings_are_named(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ=environ)


def test_any_span_trains_by_fraction_with_thresholds_in_the_metadata(tmp_path: Path) -> None:
    """Data outside the old default dates (2023-01..2024-04) trains with no argument."""
    data = tmp_path / "klines"
    generate(data, start="2025-03", end="2025-08", seed=3)
    config = load_config(
        overrides={"data": str(data), "params": {t: {"n_estimators": 40} for t in NATIVE_FILES}},
        environ={},
    )
    prepared = prepare_data(config)
    meta = train_model(ModelSpec("m"), config, prepared, tmp_path / "models")
    bounds = {k: [np.datetime64(t[:-1]) for t in v] for k, v in meta.metrics["bounds"].items()}
    first = np.datetime64("2025-03-01T00:00") + np.timedelta64(F.LOOKBACK_PERIODS - 1, "h")
    last = np.datetime64("2025-09-01T00:00")  # the last usable bar ends one horizon early
    span = last - first
    assert bounds["train"][0] == first
    assert abs((bounds["train"][1] - first) / span - 0.6) < 0.01
    gap = np.timedelta64(F.LOOKBACK_PERIODS + 1, "h")
    assert bounds["validation"][0] == bounds["train"][1] + gap
    assert abs((bounds["validation"][1] - first) / span - 0.8) < 0.01
    assert bounds["test"][0] == bounds["validation"][1] + gap

    t = meta.signal_thresholds
    assert t["rule"] == RULE and 0 < t["sell"] < t["buy"] < 1
    assert t["validation"]["buy_share"] >= config.signal_min_share
    assert t["validation"]["sell_share"] >= config.signal_min_share
    test = meta.metrics["signals"]["test"]
    assert sum(test["share"].values()) == pytest.approx(1.0)
    assert test["buy"]["count"] + test["sell"]["count"] <= test["samples"]
    assert [name for name, _ in meta.metrics["top_features"]] == _csv_top(tmp_path / "models/m")


def _csv_top(model_dir: Path) -> list[str]:
    rows = (model_dir / "feature_importance.csv").read_text().splitlines()[1:6]
    return [row.split(",")[0] for row in rows]


def _check_model(models: Path, lookback: int, names: list[str]) -> ModelMetadata:
    meta = ModelMetadata.read(models / "model_1")
    assert (meta.lookback, meta.feature_names) == (lookback, names)
    assert meta.features_hash == F.FeatureSet(tuple(names), lookback).definitions_hash()
    assert not (models / "model_2").exists()
    return meta


def _check_printout(out: str) -> None:
    for words in (
        "model_1: lightgbm v1",
        "accuracy",
        "precision",
        "recall",
        "AUC",
        "test signal mix: BUY",
        "test BUY (long):",
        "test SELL (short):",
        "vs base",
        "top features (share of gain):",
    ):
        assert words in out, f"{words!r} not printed:\n{out}"


def test_cli_set_and_environment(small_dataset: Path, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "training", "train", "--data", str(small_dataset), "--only"]
    base += ["model_1", "--set", f"params.lightgbm={FAST}"]
    sets = ["--set", "LOOKBACK_PERIODS=61", "--set", f"FEATURES={','.join(SUBSET)}"]
    by_set = subprocess.run(
        [*base, "--models-dir", str(tmp_path / "a"), *sets],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=harness.REPO,
        timeout=300,
    )
    assert by_set.returncode == 0, by_set.stderr
    _check_model(tmp_path / "a", 61, SUBSET)
    _check_printout(by_set.stdout)

    by_env = subprocess.run(
        [*base, "--models-dir", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        env=_clean_env(LOOKBACK_PERIODS="64", FEATURES=",".join(reversed(SUBSET))),
        cwd=harness.REPO,
        timeout=300,
    )
    assert by_env.returncode == 0, by_env.stderr
    _check_model(tmp_path / "b", 64, list(reversed(SUBSET)))

    refused = subprocess.run(
        [*base, "--models-dir", str(tmp_path / "c"), "--set", "FEATURES=rsi_14,macd_x"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=harness.REPO,
        timeout=300,
    )
    assert refused.returncode == 1 and "unknown features 'macd_x'" in refused.stderr
    assert not (tmp_path / "c").exists()


def test_make_train_passes_the_variables_on(small_dataset: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    run = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "train",
            f"DATA={small_dataset}",
            f"MODELS_DIR={models}",
            "ONLY=model_1",
            "LOOKBACK_PERIODS=70",
            f"FEATURES={','.join(SUBSET[:3])}",
            "TRAIN_START_DATE=2023-01-10",
            "TRAIN_END_DATE=2023-04-20",
        ],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=harness.REPO,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    meta = _check_model(models, 70, SUBSET[:3])
    assert meta.metrics["bounds"]["train"] == ["2023-01-10T00:00:00Z", "2023-04-21T00:00:00Z"]
    _check_printout(run.stdout)
