"""Train models end to end: load -> features -> labels -> split -> fit -> evaluate -> write.

A model directory is built in a temporary directory beside its final place and renamed into it
at the end, so a failed run -- too few samples, a single class, a crash -- leaves the previous
model exactly as it was.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from training import features
from training.calibration import CalibrationError, fit_platt
from training.calibration import apply as apply_calibration
from training.calibration import report as calibration_report
from training.config import ModelSpec, TrainConfig
from training.evaluate import (
    baseline_probabilities,
    evaluate_split,
    find_lookahead,
)
from training.features import FeatureSet
from training.klines import Klines, load_klines
from training.labels import forward_log_return, label_from_return
from training.metadata import (
    MetadataError,
    ModelMetadata,
)
from training.split import (
    TimeSplit,
    fraction_split,
    iso_ms,
    min_gap_bars,
    time_split,
    walk_forward,
)
from training.thresholds import ThresholdError, choose_thresholds, signal_report
from training.trainers import MIN_TRAINING_SAMPLES, TreeModel, make_model, write_model_dir

logger = logging.getLogger(__name__)

_PREV_RETURN = features.FEATURE_NAMES.index("log_return_1")


class TrainingError(RuntimeError):
    """Training cannot produce a trustworthy model (the message names the problem)."""


#: Features listed (with their share of the importance) in the metadata's metrics and printed.
TOP_FEATURES = 5


@dataclass(frozen=True)
class PreparedData:
    """Candles and their features, shared by every model trained on the same data."""

    klines: Klines
    candles: dict[str, np.ndarray]
    features: np.ndarray
    """Every defined feature over the default lookback (the baselines read it)."""
    step_ms: int
    _matrices: dict[FeatureSet, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def matrix(self, selection: FeatureSet) -> np.ndarray:
        """The features of one model's selection (``FEATURES`` over ``LOOKBACK_PERIODS``)."""
        if selection.is_default:
            return self.features
        if selection not in self._matrices:
            self._matrices[selection] = selection.compute(self.candles)
        return self._matrices[selection]


def prepare_data(config: TrainConfig) -> PreparedData:
    """Load the configured kline files and featurise them."""
    from training.klines import interval_ms

    klines = load_klines(config.data, interval=config.interval, policy=config.anomaly_policy)
    logger.info("loaded %s %s: %s", klines.symbol, klines.interval, klines.report.summary())
    candles = features.candles_from_frame(klines.frame)
    return PreparedData(
        klines, candles, features.compute_features(candles), interval_ms(klines.interval)
    )


def check_no_lookahead(candles: dict[str, np.ndarray], rows: int = 1_000) -> None:
    """Fail if a feature of the shipped feature code changes when future candles are removed."""
    tail = {k: v[-rows:] for k, v in candles.items()}
    if len(tail["close"]) <= features.LOOKBACK_PERIODS + 1:
        return
    leaking = find_lookahead(features.compute_features, tail, features.FEATURE_NAMES, probes=5)
    if leaking:
        raise TrainingError(f"features look into the future: {', '.join(leaking)}")


def _split(
    config: TrainConfig, data: PreparedData, usable: np.ndarray, horizon: int, lookback: int
) -> TimeSplit:
    gap = max(config.gap_bars or 0, min_gap_bars(horizon, lookback))
    if config.train_end_date is None:
        try:
            return fraction_split(
                data.candles["open_time"],
                usable,
                train_fraction=config.train_fraction,
                validation_fraction=config.validation_fraction,
                step_ms=data.step_ms,
                gap_bars=gap,
                train_start=config.train_start_date,
            )
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
    return time_split(
        data.candles["open_time"],
        usable,
        train_start=config.train_start_date or iso_ms(int(data.candles["open_time"][0]))[:10],
        train_end=config.train_end_date,
        step_ms=data.step_ms,
        gap_bars=gap,
        validation_end=config.validation_end_date,
        test_end=config.test_end_date,
    )


def _check_trainable(name: str, split: TimeSplit, y: np.ndarray) -> None:
    n = len(split.train)
    if n < MIN_TRAINING_SAMPLES:
        raise TrainingError(
            f"{name}: only {n} training samples between the training dates "
            f"(need at least {MIN_TRAINING_SAMPLES}); widen TRAIN_START_DATE..TRAIN_END_DATE "
            "or give more data"
        )
    classes = np.unique(y[split.train])
    if len(classes) < 2:
        raise TrainingError(
            f"{name}: every training label is {int(classes[0])}; a single class cannot be "
            "learned (check horizon, fee and threshold)"
        )
    if len(split.validation) == 0:
        raise TrainingError(
            f"{name}: no validation samples after the training period and its gap; "
            "give data beyond TRAIN_END_DATE"
        )


def _fit_and_score(
    spec: ModelSpec, config: TrainConfig, data: PreparedData, y: np.ndarray, split: TimeSplit
) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:
    selection = config.feature_set(spec)
    x = data.matrix(selection)
    model = make_model(
        spec.model_type,
        config.model_params(spec),
        feature_names=list(selection.names),
        seed=config.seed,
        num_threads=config.num_threads,
    )
    tr, va = split.train, split.validation
    model.fit(x[tr], y[tr], x[va], y[va])
    periods = {"validation": split.validation, "test": split.test}
    proba = {p: model.predict_proba(x[rows]) for p, rows in periods.items() if len(rows)}
    prev = data.features[:, _PREV_RETURN]
    baselines = {p: baseline_probabilities(y[tr], prev[tr], prev[periods[p]]) for p in proba}
    labels = {p: y[periods[p]] for p in proba}
    return model, evaluate_split(proba, labels, baselines), proba


def _walk_forward(
    spec: ModelSpec, config: TrainConfig, data: PreparedData, y: np.ndarray, usable: np.ndarray
) -> list[dict[str, Any]]:
    lookback = config.feature_set(spec).lookback
    gap = max(config.gap_bars or 0, min_gap_bars(_horizon(spec, config), lookback))
    folds = []
    for k, split in enumerate(
        walk_forward(
            data.candles["open_time"],
            usable,
            folds=config.walk_forward_folds,
            step_ms=data.step_ms,
            gap_bars=gap,
        )
    ):
        _check_trainable(f"{spec.name} walk-forward fold {k}", split, y)
        _, report, _ = _fit_and_score(spec, config, data, y, split)
        folds.append({"fold": k, "bounds": _bounds(split), **report})
    return folds


def _horizon(spec: ModelSpec, config: TrainConfig) -> int:
    return spec.horizon if spec.horizon is not None else config.horizon


def _bounds(split: TimeSplit) -> dict[str, list[str]]:
    return {p: [iso_ms(lo), iso_ms(hi)] for p, (lo, hi) in split.bounds.items()}


def _previous_version(model_dir: Path) -> int | None:
    if not model_dir.exists():
        return None
    try:
        return ModelMetadata.read(model_dir).version
    except MetadataError:
        logger.warning("%s has no readable metadata; starting versions again at 1", model_dir)
        return None


def _highest_kept_version(models_dir: Path, name: str) -> int:
    """Highest version a model server keeps in ``models_dir/.versions/<name>/<version>/``
    (see xylen_server.versions.history), so a retrain after a rollback never reuses a number."""
    kept = Path(models_dir) / ".versions" / name
    if not kept.is_dir():
        return 0
    return max((int(p.name) for p in kept.iterdir() if p.name.isdigit()), default=0)


def train_model(
    spec: ModelSpec, config: TrainConfig, data: PreparedData, models_dir: Path
) -> ModelMetadata:
    """Train one model and write ``models_dir/<name>/`` atomically; returns its metadata."""
    horizon = _horizon(spec, config)
    fee = spec.fee if spec.fee is not None else config.fee
    threshold = spec.threshold if spec.threshold is not None else config.threshold
    candles = data.candles
    selection = config.feature_set(spec)
    moves = forward_log_return(candles["open_time"], candles["close"], horizon, data.step_ms)
    y = label_from_return(moves, fee=fee, threshold=threshold)
    usable = np.isfinite(data.matrix(selection)).all(axis=1) & np.isfinite(y)
    split = _split(config, data, usable, horizon, selection.lookback)
    _check_trainable(spec.name, split, y)

    model, metrics, raw = _fit_and_score(spec, config, data, y, split)
    if config.walk_forward_folds > 0:
        metrics["walk_forward"] = _walk_forward(spec, config, data, y, usable)
    return finish_model(
        spec, config, model, metrics, raw, y, moves, split,
        data.candles["open_time"], data.klines, data.step_ms, models_dir,
    )  # fmt: skip


def finish_model(
    spec: ModelSpec,
    config: TrainConfig,
    model: TreeModel,
    metrics: dict[str, Any],
    raw: dict[str, np.ndarray],
    y: np.ndarray,
    moves: np.ndarray,
    split: TimeSplit,
    open_time: np.ndarray,
    klines: Klines,
    step_ms: int,
    models_dir: Path,
) -> ModelMetadata:
    """Everything after the fit, shared by :func:`train_model` and the Dask path
    (:mod:`training.dask_train`): calibrate on validation, choose the thresholds, report the
    signals and top features, and write the model directory atomically. ``raw`` holds the
    model's P(up) of the validation (and test) rows, ``metrics`` their evaluation; ``y``,
    ``moves`` and ``open_time`` are indexed like ``split``; only ``klines``' symbol, interval,
    files and report are read."""
    horizon = _horizon(spec, config)
    fee = spec.fee if spec.fee is not None else config.fee
    threshold = spec.threshold if spec.threshold is not None else config.threshold
    selection = config.feature_set(spec)
    # Calibrate on the validation split, then choose the thresholds on the calibrated scale
    # (a strictly increasing map: the same bars are selected as on the raw scale).
    try:
        fitted = fit_platt(raw["validation"], y[split.validation])
    except CalibrationError as exc:
        raise TrainingError(f"{spec.name}: {exc}") from None
    periods = {"validation": split.validation, "test": split.test}
    fitted["validation"] = calibration_report(raw["validation"], y[split.validation], fitted)
    metrics["calibration"] = {
        period: calibration_report(raw[period], y[periods[period]], fitted) for period in raw
    }
    proba = {period: apply_calibration(fitted, p) for period, p in raw.items()}
    try:
        thresholds = choose_thresholds(
            proba["validation"],
            moves[split.validation],
            fee=fee,
            min_share=config.signal_min_share,
            max_share=config.signal_max_share,
        )
    except ThresholdError as exc:
        raise TrainingError(f"{spec.name}: {exc}") from None
    metrics["signals"] = {
        period: signal_report(
            proba[period],
            moves[rows],
            buy=thresholds["buy"],
            sell=thresholds["sell"],
            fee=fee,
            label_threshold=threshold,
        )
        for period, rows in (("validation", split.validation), ("test", split.test))
        if period in proba
    }
    importance = model.feature_importance()
    total = sum(importance.values()) or 1.0
    metrics["top_features"] = [
        [name, gain / total]
        for name, gain in sorted(importance.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_FEATURES]
    ]
    metrics["best_iteration"] = model.best_iteration
    metrics["bounds"] = _bounds(split)

    target = Path(models_dir) / spec.name
    previous = _previous_version(target)
    used = np.concatenate([split.train, split.validation, split.test])
    meta = ModelMetadata(
        name=spec.name,
        model_type=spec.model_type,
        version=max(previous or 0, _highest_kept_version(Path(models_dir), spec.name)) + 1,
        parent_version=previous,
        training_samples=len(split.train),
        trained_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        feature_names=list(selection.names),
        lookback=selection.lookback,
        features_hash=selection.definitions_hash(),
        horizon=horizon,
        fee=fee,
        label_threshold=threshold,
        symbol=klines.symbol or config.symbol,
        interval=klines.interval,
        data={
            "start": iso_ms(int(open_time[used].min())),
            "end": iso_ms(int(open_time[used].max()) + step_ms),
            # Absolute: a retrain started from any working directory finds its history.
            "files": [
                {"path": str(Path(f.path).resolve()), "sha256": f.sha256, "rows": f.rows}
                for f in klines.files
            ],
            "quality": asdict(klines.report),
            "anomaly_policy": config.anomaly_policy,
        },
        metrics=metrics,
        params={**model.params, "seed": config.seed, "num_threads": config.num_threads},
        signal_thresholds=thresholds,
        calibration=fitted,
    )
    meta = write_model_dir(target, model, meta)
    logger.info(
        "%s v%d (%s, horizon %d): validation AUC %s, test AUC %s",
        spec.name,
        meta.version,
        spec.model_type,
        horizon,
        metrics["validation"]["model"]["auc"],
        metrics.get("test", {}).get("model", {}).get("auc"),
    )
    return meta


def train_models(
    config: TrainConfig, names: list[str] | None = None, models_dir: Path | None = None
) -> list[ModelMetadata]:
    """Train the configured set (or the ``names`` among it) from one load of the data."""
    specs = [config.model(n) for n in names] if names else list(config.models)
    data = prepare_data(config)
    check_no_lookahead(data.candles)
    out = Path(models_dir or config.models_dir)
    return [train_model(spec, config, data, out) for spec in specs]
