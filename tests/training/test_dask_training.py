"""Training on Dask (training/dask_train.py): partitions featurised file by file equal the whole
series, a LocalCluster of two worker processes on loopback trains LightGBM and XGBoost into
model directories a real server loads (ONNX parity checked) and answers from, and CatBoost,
which has no Dask path, is refused or trained in-process with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import harness
import numpy as np
import polars as pl
import pytest

from training import features
from training.config import load_config
from training.dask_train import featurise_part, train_model_dask, train_models_dask
from training.generator import generate, kline_csv
from training.klines import kline_files, load_klines
from training.labels import forward_log_return, label_from_return
from training.metadata import ModelMetadata
from training.pipeline import TrainingError, prepare_data
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc

HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def year(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dask-data")
    generate(out, interval="1h", start="2024-01", end="2024-12", seed=5)
    return out


def _parts(files: list[Path], lookback: int = 100, horizon: int = 1, names=None) -> list:
    paths = [str(p) for p in files]
    return [
        featurise_part(paths, i, lookback, names, horizon, 0.001, 0.0, None, "drop")
        for i in range(len(paths))
    ]


def _whole(files: list[Path], selection: features.FeatureSet, horizon: int):
    klines = load_klines(files)
    candles = features.candles_from_frame(klines.frame)
    moves = forward_log_return(candles["open_time"], candles["close"], horizon, HOUR_MS)
    return candles, selection.compute(candles), moves


def test_partitions_equal_the_concatenated_series(year):
    files = kline_files(year)
    parts = _parts(files, horizon=4)
    candles, x, moves = _whole(files, features.FeatureSet.of(None, 100), 4)
    assert len(parts) == 12 and all(len(p.open_time) > 600 for p in parts)
    assert np.array_equal(np.concatenate([p.open_time for p in parts]), candles["open_time"])
    got = np.concatenate([p.x for p in parts])
    assert np.array_equal(got, x.astype(np.float32), equal_nan=True)
    # Only the very first bars lack history; every later partition is warmed up fully.
    assert np.isnan(got[:50]).any() and np.isfinite(got[200:]).all()
    assert np.array_equal(np.concatenate([p.moves for p in parts]), moves, equal_nan=True)
    y = label_from_return(moves, fee=0.001, threshold=0.0)
    assert np.array_equal(np.concatenate([p.y for p in parts]), y, equal_nan=True)


def test_warm_up_spans_several_small_files(year, tmp_path):
    """Files shorter than the lookback (40 bars each): a partition's warm-up reaches back over
    several files and its labels forward over the next, and still equals the whole series."""
    frame = load_klines(kline_files(year)[:1]).frame.head(400)
    small = []
    for k in range(10):
        chunk = frame.slice(k * 40, 40).with_columns(pl.lit(0).alias("ignore"))
        path = tmp_path / f"BTCUSDT-1h-part{k:02d}.csv"
        path.write_bytes(kline_csv(chunk))
        small.append(path)
    selection = features.FeatureSet.of(["log_return_1", "rsi_14", "realized_vol_60"], 61)
    parts = _parts(small, lookback=61, horizon=3, names=list(selection.names))
    _, x, moves = _whole(small, selection, 3)
    assert np.array_equal(
        np.concatenate([p.x for p in parts]), x.astype(np.float32), equal_nan=True
    )
    assert np.array_equal(np.concatenate([p.moves for p in parts]), moves, equal_nan=True)
    assert np.isfinite(parts[-1].x).all() and np.isnan(parts[-1].moves[-3:]).all()


def test_catboost_has_no_dask_path(year, tmp_path, caplog):
    config = load_config(None, {"data": str(year), "models_dir": str(tmp_path)})
    with pytest.raises(TrainingError, match="catboost has no Dask training"):
        train_model_dask(None, config.model("model_3"), config, tmp_path)
    walk = load_config(None, {"data": str(year), "walk_forward_folds": 2})
    with pytest.raises(TrainingError, match="walk-forward folds are not run on Dask"):
        train_models_dask(walk, ["model_1"], tmp_path)


@pytest.fixture(scope="module")
def dask_models(year: Path, tmp_path_factory: pytest.TempPathFactory):
    """model_1 (LightGBM) and model_2 (XGBoost) trained on a LocalCluster of two worker
    processes on 127.0.0.1, no dashboard; model_1 trained in this process beside it."""
    out = tmp_path_factory.mktemp("dask-models")
    config = load_config(None, {"data": str(year), "models_dir": str(out)})
    metas = train_models_dask(config, ["model_1", "model_2"], out, cluster="local")
    plain = tmp_path_factory.mktemp("plain-models")
    from training.pipeline import train_model

    single = train_model(config.model("model_1"), config, prepare_data(config), plain)
    return out, {m.name: m for m in metas}, single


def test_dask_trains_the_same_model_directory(dask_models):
    out, metas, single = dask_models
    for name, kind, native in (
        ("model_1", "lightgbm", "lightgbm_model.txt"),
        ("model_2", "xgboost", "xgboost_model.json"),
    ):
        files = {p.name for p in (out / name).iterdir()}
        assert {"metadata.json", "model.onnx", "feature_importance.csv", native} <= files
        meta = ModelMetadata.read(out / name)
        assert meta.model_type == kind and meta.version == 1
        assert meta.metrics["trained_on"] == {"dask": True, "partitions": 12}
        assert meta.params["dask_workers"] == 2
        assert 0 < meta.signal_thresholds["sell"] < meta.signal_thresholds["buy"] < 1
        assert meta.calibration["method"] == "platt"
        assert meta.metrics["best_iteration"] >= 1
    # The same split, bounds, files and metadata keys as a single-process run on the same data.
    dask_meta = metas["model_1"]
    assert dask_meta.metrics["bounds"] == single.metrics["bounds"]
    assert dask_meta.training_samples == single.training_samples
    assert dask_meta.data["files"] == single.data["files"]
    assert dask_meta.data["start"] == single.data["start"]
    assert dask_meta.data["quality"] == single.data["quality"]
    assert set(dask_meta.metrics) - {"trained_on"} == set(single.metrics)


def test_dask_model_serves(dask_models, year):
    out, metas, _ = dask_models
    candles = features.candles_from_frame(load_klines(kline_files(year)[-1:]).frame)
    x = features.compute_features(candles)[-20:]
    for name in ("model_1", "model_2"):
        server = harness.InProcessServer(harness.server_settings(out, model_name=name))
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.ModelServiceStub(channel)
                info = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info
                assert info.name == name and info.version == 1
                assert info.engine == pb.ENGINE_ONNX
                assert info.training_samples == metas[name].training_samples
                assert info.buy_threshold == pytest.approx(metas[name].signal_thresholds["buy"])
                answer = stub.Predict(
                    pb.PredictRequest(inputs=[harness.feature_input(r) for r in x])
                )
                probabilities = [p.probability_up for p in answer.predictions]
                assert len(probabilities) == 20 and len(set(probabilities)) > 1
                assert all(0 < p < 1 for p in probabilities)
        finally:
            server.close()


def test_catboost_falls_back_to_this_process(year, tmp_path, caplog):
    config = load_config(
        None, {"data": str(year), "models_dir": str(tmp_path), "walk_forward_folds": 0}
    )
    with caplog.at_level(logging.WARNING, logger="training.dask_train"):
        (meta,) = train_models_dask(config, ["model_3"], tmp_path, cluster="local")
    assert meta.model_type == "catboost" and (tmp_path / "model_3" / "model.onnx").exists()
    assert "trained_on" not in meta.metrics
    assert "catboost has no Dask training" in caplog.text


def test_lightgbm_round_choice_is_early_stoppings(candles):
    """The client's pick from the workers' per-round validation losses is the iteration
    ``lgb.early_stopping`` keeps when it watches the same validation rows."""
    import lightgbm as lgb

    from training.dask_train import Part, _round_losses, early_stopping_round

    x, _ = harness.training_rows(candles)
    # A label the features partly explain (30% flipped), so the best round is well inside.
    flip = np.random.default_rng(0).random(len(x)) < 0.3
    y = ((x[:, 0] > np.median(x[:, 0])) ^ flip).astype(np.int64)
    train, valid = slice(0, 2000), slice(2100, None)
    params = {"objective": "binary", "verbose": -1, "learning_rate": 0.1, "num_leaves": 15}
    params |= {"deterministic": True, "force_row_wise": True, "num_threads": 1, "seed": 3}
    stopped = lgb.train(
        params,
        lgb.Dataset(x[train], y[train]),
        num_boost_round=200,
        valid_sets=[lgb.Dataset(x[valid], y[valid])],
        callbacks=[lgb.early_stopping(10, verbose=False)],
    )
    full = lgb.train(params, lgb.Dataset(x[train], y[train]), num_boost_round=200)
    rows = np.arange(len(y[valid]))
    halves = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]  # two workers' validation rows
    empty = np.empty(0)
    part = Part(x[valid], y[valid].astype(float), empty, empty, empty, None, None, "", "1h")  # type: ignore[arg-type]
    losses = sum(_round_losses(part, r, full.model_to_string()) for r in halves)
    assert 1 < stopped.best_iteration < 200
    assert early_stopping_round(losses, 10) == stopped.best_iteration
