"""Training on Dask: the same models, from data read and featurised partition by partition.

``make train CLUSTER=local`` (a ``dask.distributed`` LocalCluster on loopback) or
``DASK_SCHEDULER=tcp://host:8786`` (a running scheduler) trains LightGBM through
``lightgbm.dask`` and XGBoost through ``xgboost.dask``:

1. **One partition per kline file.** A worker reads its file with polars plus just enough of
   the files before it (the feature lookback, the warm-up) and after it (the label horizon),
   loads them with :func:`training.klines.load_klines` (the same de-duplication and anomaly
   policy as a single-process run), computes the features with the same
   :class:`training.features.FeatureSet` and the labels with :mod:`training.labels`, and keeps
   only its own rows: the open times from its file's first bar up to the next file's first.
   So every row's features see exactly the history they see on the whole series (tested: the
   partitions' features equal the concatenated series' features, bit for bit).
2. **The split** is decided on the client from each row's open time and usability (two small
   columns), by the same :mod:`training.split` functions as a single-process run.
3. **The fit** runs on the workers; feature rows never leave them. LightGBM
   (``DaskLGBMClassifier``, data-parallel) trains the configured rounds, each worker sums the
   log loss of its validation rows after every round, and the client keeps the trees up to the
   round early stopping would have kept (the best, the search ending ``early_stopping_rounds``
   rounds without improvement); XGBoost (``xgboost.dask.train``) early-stops on the validation
   rows itself.
4. **Predictions** of the validation and test rows are made where the rows are, by the model
   class's own ``predict_proba``; only the probabilities come to the client.
5. **Everything after the fit** is :func:`training.pipeline.finish_model`, as in a
   single-process run: Platt calibration and thresholds on the validation probabilities, the
   signal report, metadata, the native file, ``model.onnx`` and its parity check against the
   booster. The client holds one value per bar of a few columns, never a feature matrix.

CatBoost has no Dask training (there is no ``catboost.dask``): a CatBoost model in the set is
trained in the client process on the whole series, as plain ``make train`` does, with a warning
saying so; :func:`train_model_dask` refuses one outright. Walk-forward folds
(``WALK_FORWARD_FOLDS``) are not run on Dask (refused with a message).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from training import features
from training.config import ModelSpec, TrainConfig
from training.evaluate import baseline_probabilities, evaluate_split
from training.klines import (
    InputFile,
    Klines,
    QualityReport,
    interval_ms,
    kline_files,
    load_klines,
    read_kline_file,
)
from training.labels import forward_log_return, label_from_return
from training.metadata import ModelMetadata
from training.pipeline import (
    PreparedData,
    TrainingError,
    _check_trainable,
    _horizon,
    _split,
    finish_model,
)
from training.trainers import LightGBMModel, TreeModel, XGBoostModel, as_features, make_model

logger = logging.getLogger(__name__)

DASK_MODEL_TYPES = ("lightgbm", "xgboost")
_PREV_RETURN = features.FEATURE_NAMES.index("log_return_1")


@dataclass(frozen=True)
class Part:
    """One partition's rows (its own file's bars), featurised with the history before it."""

    x: np.ndarray
    """float32 (rows, features) of the model's feature selection."""
    y: np.ndarray
    """Labels (NaN where the horizon runs past the data)."""
    moves: np.ndarray
    """Forward log returns over the horizon (the threshold search and signal report)."""
    open_time: np.ndarray
    prev: np.ndarray
    """``log_return_1`` (the previous-return baseline)."""
    file: InputFile
    report: QualityReport
    symbol: str
    interval: str


def _open_times(path: Path) -> pl.Series:
    frame, _ = read_kline_file(path)
    t = frame["open_time"]
    return pl.Series(np.where(t >= 10**14, t // 1000, t)) if len(t) else t


def featurise_part(
    files: list[str],
    index: int,
    lookback: int,
    names: list[str] | None,
    horizon: int,
    fee: float,
    threshold: float,
    interval: str | None,
    policy: str,
) -> Part:
    """Partition ``index`` of ``files`` (in time order): its own bars with features over
    ``lookback`` bars of history (taken from the files before it) and labels over ``horizon``
    bars (taken from the files after it). Runs on a worker."""
    paths = [Path(f) for f in files]
    own_frame, own_file = read_kline_file(paths[index])
    window = [paths[index]]
    # Warm-up: whole files before this one until they hold the lookback (an hour of slack).
    need, before = lookback + 60, 0
    k = index - 1
    while k >= 0 and before < need:
        window.insert(0, paths[k])
        before += read_kline_file(paths[k])[0].height
        k -= 1
    # The horizon's future: whole files after this one until they hold it.
    need_after, after = horizon + 1, 0
    k = index + 1
    upper = None
    while k < len(paths) and after < need_after:
        window.append(paths[k])
        times = _open_times(paths[k])
        if upper is None and len(times):
            upper = int(times.min())  # type: ignore[arg-type]
        after += len(times)
        k += 1
    own_times = _open_times(paths[index])
    lower = int(own_times.min()) if len(own_times) else 0  # type: ignore[arg-type]
    klines = load_klines(window, interval=interval, policy=policy)
    own = load_klines([paths[index]], interval=klines.interval, policy=policy)
    candles = features.candles_from_frame(klines.frame)
    selection = features.FeatureSet.of(names, lookback)
    x = selection.compute(candles)
    prev = (
        x[:, list(selection.names).index("log_return_1")]
        if "log_return_1" in selection.names
        else features.compute_features(candles)[:, _PREV_RETURN]
    )
    step = interval_ms(klines.interval)
    moves = forward_log_return(candles["open_time"], candles["close"], horizon, step)
    y = label_from_return(moves, fee=fee, threshold=threshold)
    t = candles["open_time"]
    mine = (t >= lower) & (t < upper) if upper is not None else t >= lower
    del own_frame
    return Part(
        x=as_features(x[mine]),
        y=y[mine],
        moves=moves[mine],
        open_time=t[mine],
        prev=prev[mine],
        file=own_file,
        report=own.report,
        symbol=klines.symbol,
        interval=klines.interval,
    )


def _rows(part: Part, rows: np.ndarray, column: str) -> np.ndarray:
    """``column`` of ``part`` at ``rows`` (partition-local indices). Runs on a worker."""
    return np.asarray(getattr(part, column))[rows]


def _summary(part: Part) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the client needs of a partition to split: open times, usability, labels, moves,
    previous returns (one value per row each)."""
    usable = np.isfinite(part.x).all(axis=1) & np.isfinite(part.y)
    return part.open_time, usable, part.y, part.moves, part.prev


def _part_meta(part: Part) -> tuple[InputFile, QualityReport, str, str]:
    return part.file, part.report, part.symbol, part.interval


@contextmanager
def dask_client(cluster: str | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A ``dask.distributed`` Client: on ``scheduler`` (``tcp://...``, or ``DASK_SCHEDULER``),
    else on a LocalCluster of two single-threaded worker processes on 127.0.0.1 with no
    dashboard (``cluster="local"``). Worker processes, not threads: LightGBM's distributed
    network is per process, so two workers in one process cannot train together."""
    from distributed import Client, LocalCluster

    scheduler = scheduler or os.environ.get("DASK_SCHEDULER") or None
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    if cluster not in (None, "local"):
        raise TrainingError(f"CLUSTER={cluster!r}: use CLUSTER=local or DASK_SCHEDULER=tcp://...")
    workers = int(os.environ.get("DASK_WORKERS", "2"))
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit=0,
        ) as local,
        Client(local) as client,
    ):
        yield client


def _check_dask_spec(spec: ModelSpec, config: TrainConfig) -> None:
    if spec.model_type not in DASK_MODEL_TYPES:
        raise TrainingError(
            f"{spec.name}: {spec.model_type} has no Dask training (only "
            f"{' and '.join(DASK_MODEL_TYPES)} do); train it without CLUSTER/DASK_SCHEDULER "
            f"(make train ONLY={spec.name})"
        )
    if config.walk_forward_folds > 0:
        raise TrainingError(
            f"{spec.name}: walk-forward folds are not run on Dask; set WALK_FORWARD_FOLDS=0 or "
            "train without CLUSTER/DASK_SCHEDULER"
        )


def train_model_dask(
    client: Any, spec: ModelSpec, config: TrainConfig, models_dir: Path
) -> ModelMetadata:
    """Train one LightGBM or XGBoost model on the cluster of ``client`` and write its model
    directory exactly as :func:`training.pipeline.train_model` does. Feature rows stay on the
    workers; the client holds one value per bar of a few columns (open time, usability, label,
    forward return, previous return) and the probabilities of the validation and test bars."""
    _check_dask_spec(spec, config)
    files = [str(p) for p in kline_files(config.data)]
    horizon = _horizon(spec, config)
    fee = spec.fee if spec.fee is not None else config.fee
    threshold = spec.threshold if spec.threshold is not None else config.threshold
    selection = config.feature_set(spec)
    names = None if selection.is_default else list(selection.names)
    parts = [
        client.submit(
            featurise_part,
            files,
            i,
            selection.lookback,
            names,
            horizon,
            fee,
            threshold,
            config.interval,
            config.anomaly_policy,
            pure=False,
        )
        for i in range(len(files))
    ]
    summaries = client.gather([client.submit(_summary, p) for p in parts])
    metas = client.gather([client.submit(_part_meta, p) for p in parts])
    open_time = np.concatenate([s[0] for s in summaries])
    if len(open_time) > 1 and not (np.diff(open_time) > 0).all():
        raise TrainingError(
            "the kline files overlap or are out of order once partitioned by file; give one "
            "series whose files follow each other in name order"
        )
    usable = np.concatenate([s[1] for s in summaries])
    y = np.concatenate([s[2] for s in summaries])
    moves = np.concatenate([s[3] for s in summaries])
    prev = np.concatenate([s[4] for s in summaries])
    offsets = np.cumsum([0] + [len(s[0]) for s in summaries])
    del summaries
    klines = _klines(metas, open_time)
    step = interval_ms(klines.interval)
    shim = PreparedData(klines, {"open_time": open_time}, np.empty((0, 0)), step)
    split = _split(config, shim, usable, horizon, selection.lookback)
    _check_trainable(spec.name, split, y)

    def local(rows: np.ndarray) -> list[np.ndarray]:
        return [rows[(rows >= lo) & (rows < hi)] - lo for lo, hi in itertools.pairwise(offsets)]

    n_features = len(selection.names)
    train_x, train_y = _dask_arrays(client, parts, local(split.train), n_features)
    valid_x, valid_y = _dask_arrays(client, parts, local(split.validation), n_features)
    model = make_model(
        spec.model_type,
        config.model_params(spec),
        feature_names=list(selection.names),
        seed=config.seed,
        num_threads=1,
    )
    if isinstance(model, LightGBMModel):
        _fit_lightgbm(client, model, train_x, train_y, parts, local(split.validation))
    else:
        assert isinstance(model, XGBoostModel)
        _fit_xgboost(client, model, train_x, train_y, valid_x, valid_y)
    model.params = {**model.params, "dask_workers": len(client.scheduler_info()["workers"])}
    blob = _serialise(model)
    periods = {"validation": split.validation, "test": split.test}
    proba = {
        period: _predicted(client, parts, local(rows), spec.model_type, blob, model.feature_names)
        for period, rows in periods.items()
        if len(rows)
    }
    tr = split.train
    baselines = {p: baseline_probabilities(y[tr], prev[tr], prev[periods[p]]) for p in proba}
    labels = {p: y[periods[p]] for p in proba}
    metrics = evaluate_split(proba, labels, baselines)
    metrics["trained_on"] = {"dask": True, "partitions": len(files)}
    return finish_model(
        spec, config, model, metrics, proba, y, moves, split, open_time, klines, step, models_dir
    )


def _serialise(model: TreeModel) -> bytes:
    """The model's trees as bytes a worker turns back into the same booster."""
    if isinstance(model, LightGBMModel):
        return str(model.booster.model_to_string()).encode()
    assert isinstance(model, XGBoostModel)
    return bytes(model.booster.save_raw("json"))


def _predict_rows(
    part: Part, rows: np.ndarray, model_type: str, blob: bytes, feature_names: list[str]
) -> np.ndarray:
    """P(up) of ``rows`` of ``part`` by the model in ``blob``, through the model class's own
    ``predict_proba`` (what a single-process run calls). Runs on a worker."""
    model = make_model(model_type, feature_names=feature_names, num_threads=1)
    if isinstance(model, LightGBMModel):
        import lightgbm as lgb

        model.booster = lgb.Booster(model_str=blob.decode())
    else:
        import xgboost as xgb

        assert isinstance(model, XGBoostModel)
        model.booster = xgb.Booster(model_file=bytearray(blob))
    return model.predict_proba(part.x[rows])


def _predicted(
    client: Any,
    parts: list[Any],
    rows: list[np.ndarray],
    model_type: str,
    blob: bytes,
    feature_names: list[str],
) -> np.ndarray:
    """P(up) of the rows of every partition, computed where they are, in row order."""
    shipped = client.scatter(blob, broadcast=True, hash=False)
    pieces = [
        client.submit(_predict_rows, p, r, model_type, shipped, feature_names)
        for p, r in zip(parts, rows, strict=True)
        if len(r)
    ]
    return np.concatenate(client.gather(pieces))


def _klines(
    metas: list[tuple[InputFile, QualityReport, str, str]], open_time: np.ndarray
) -> Klines:
    """The Klines record (files, quality, symbol, interval) of the partitions, without the
    frame: per-file counts summed, gaps counted over the whole series."""
    reports = [m[1] for m in metas]
    interval = metas[0][3]
    step = interval_ms(interval)
    missing = np.clip(np.diff(open_time) // step - 1, 0, None) if len(open_time) > 1 else []
    total = sum(r.rows for r in reports)
    report = QualityReport(
        rows=total,
        duplicates=total - sum(r.kept + r.dropped for r in reports),
        gaps=int(np.count_nonzero(missing)),
        missing_bars=int(np.sum(missing)),
        off_grid=sum(r.off_grid for r in reports),
        irregular_close=sum(r.irregular_close for r in reports),
        zero_volume=sum(r.zero_volume for r in reports),
        dropped=sum(r.dropped for r in reports),
        kept=len(open_time),
        first_open_time=int(open_time[0]) if len(open_time) else None,
        last_open_time=int(open_time[-1]) if len(open_time) else None,
    )
    return Klines(pl.DataFrame(), report, tuple(m[0] for m in metas), metas[0][2], interval)


def _dask_arrays(
    client: Any, parts: list[Any], rows: list[np.ndarray], n_features: int
) -> tuple[Any, Any]:
    """The training rows as dask arrays whose chunks stay on the workers that made them."""
    import dask.array as da

    xs, ys = [], []
    for part, r in zip(parts, rows, strict=True):
        if not len(r):
            continue
        x = client.submit(_rows, part, r, "x")
        y = client.submit(_rows, part, r, "y")
        xs.append(da.from_delayed(x, shape=(len(r), n_features), dtype=np.float32))
        ys.append(da.from_delayed(y, shape=(len(r),), dtype=np.float64))
    return da.concatenate(xs), da.concatenate(ys)


def _fit_lightgbm(
    client: Any,
    model: LightGBMModel,
    x: Any,
    y: Any,
    parts: list[Any],
    valid_rows: list[np.ndarray],
) -> None:
    """``lightgbm.dask`` over the configured rounds, then the trees up to the round early
    stopping on the validation log loss would have stopped at (each worker sums the loss of
    its own validation rows after every round; the client adds them up)."""
    import lightgbm as lgb
    from lightgbm.dask import DaskLGBMClassifier

    rounds, patience = model._rounds()
    params = model._train_params()
    params.pop("num_threads", None)
    params.pop("metric", None)
    estimator = DaskLGBMClassifier(client=client, n_estimators=rounds, **params)
    estimator.fit(x, y.astype(np.int64), feature_name=model.feature_names)
    booster = estimator.to_local().booster_
    shipped = client.scatter(str(booster.model_to_string()), broadcast=True, hash=False)
    losses = client.gather(
        [
            client.submit(_round_losses, p, r, shipped)
            for p, r in zip(parts, valid_rows, strict=True)
            if len(r)
        ]
    )
    best = early_stopping_round(np.sum(losses, axis=0), patience)
    model.best_iteration = best
    model.booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))


def _round_losses(part: Part, rows: np.ndarray, model_str: str) -> np.ndarray:
    """The summed binary log loss of ``rows`` of ``part`` after each boosting round of the
    LightGBM model in ``model_str``. Runs on a worker."""
    import lightgbm as lgb

    booster = lgb.Booster(model_str=model_str)
    x, y = part.x[rows], part.y[rows]
    score = np.zeros(len(x))
    losses = np.empty(booster.current_iteration())
    for k in range(len(losses)):
        score += booster.predict(x, raw_score=True, start_iteration=k, num_iteration=1)
        p = np.clip(1.0 / (1.0 + np.exp(-score)), 1e-15, 1 - 1e-15)
        losses[k] = -np.sum(y * np.log(p) + (1 - y) * np.log(1 - p))
    return losses


def early_stopping_round(losses: np.ndarray, patience: int) -> int:
    """The round ``lgb.early_stopping(patience)`` keeps given the validation loss after each
    round: the best one, the search ending ``patience`` rounds without improvement."""
    best, best_loss = 0, np.inf
    for k, loss in enumerate(losses):
        if loss < best_loss:
            best, best_loss = k + 1, loss
        elif k + 1 - best >= patience:
            break
    return best


def _fit_xgboost(
    client: Any,
    model: XGBoostModel,
    x: Any,
    y: Any,
    valid_x: Any,
    valid_y: Any,
) -> None:
    """``xgboost.dask.train`` with early stopping on the validation rows (on the workers)."""
    from xgboost import dask as dxgb

    rounds, patience = model._rounds()
    params = {
        **model._native_params(),
        "objective": "binary:logistic",
        "eval_metric": "logloss",
        "tree_method": "hist",
        "seed": model.seed,
        "nthread": 1,
        "verbosity": 0,
    }
    names = model.feature_names
    train = dxgb.DaskDMatrix(client, x, y, feature_names=names)
    valid = dxgb.DaskDMatrix(client, valid_x, valid_y, feature_names=names)
    output = dxgb.train(
        client,
        params,
        train,
        num_boost_round=rounds,
        evals=[(valid, "v")],
        early_stopping_rounds=patience,
        verbose_eval=False,
    )
    booster = output["booster"]
    model.best_iteration = int(booster.best_iteration) + 1
    model.booster = booster[: model.best_iteration]


def train_models_dask(
    config: TrainConfig,
    names: list[str] | None = None,
    models_dir: Path | None = None,
    cluster: str | None = "local",
    scheduler: str | None = None,
) -> list[ModelMetadata]:
    """Train the configured set (or the ``names`` among it) on Dask. Every model is checked
    for a Dask path before any work starts."""
    specs = [config.model(n) for n in names] if names else list(config.models)
    if config.walk_forward_folds > 0:
        raise TrainingError(
            "walk-forward folds are not run on Dask; set WALK_FORWARD_FOLDS=0 or train without "
            "CLUSTER/DASK_SCHEDULER"
        )
    out = Path(models_dir or config.models_dir)
    on_dask = [s for s in specs if s.model_type in DASK_MODEL_TYPES]
    here = [s for s in specs if s.model_type not in DASK_MODEL_TYPES]
    trained: dict[str, ModelMetadata] = {}
    if on_dask:
        with dask_client(cluster, scheduler) as client:
            for spec in on_dask:
                trained[spec.name] = train_model_dask(client, spec, config, out)
    if here:
        from training.pipeline import check_no_lookahead, prepare_data, train_model

        for spec in here:
            logger.warning(
                "%s: %s has no Dask training (lightgbm.dask and xgboost.dask exist, catboost "
                "has none); training it in this process on the whole series",
                spec.name,
                spec.model_type,
            )
        data = prepare_data(config)
        check_no_lookahead(data.candles)
        for spec in here:
            trained[spec.name] = train_model(spec, config, data, out)
    return [trained[spec.name] for spec in specs]
