"""One retraining job, run as its own low-priority process: ``python -m xylen_server.learning.job
SPEC.json``. Nothing here runs inside the serving process.

The server writes a spec (:class:`JobSpec`); this process reads the feedback store's files itself
(the server does no snapshot work on its event loop's process); it
runs at low priority (``os.nice``, set by :mod:`retrain_launch` before the heavy imports),
builds a candidate,
scores it and the serving model on the same held-out window and writes ``result.json``. It
prints one JSON line per stage on stdout (``{"stage": ..., "message": ...}``), which the server
turns into TrainingStatus updates.

Samples: feedback rows of this model's feature width, ordered by close time. *New* samples are
those received after the serving model's cut-off (``metadata.data.feedback.received_until_ms``).
The held-out window is the most recent ``holdout_fraction`` of the new samples; it is never
trained on.

* incremental: LightGBM continues training the serving booster (``init_model``) on the new
  samples before the window, early-stopped on their most recent part. Other model types have no
  continued training and fall back to full.
* full: a fresh model of the serving model's type and parameters on the history (the kline files
  named in the serving model's metadata, featurised and labelled as training did, when they are
  all still there) plus every feedback sample before the window.

The gate: log loss and ROC AUC of both models on the window. The candidate passes if its log loss
is at most the serving model's plus ``margin`` and its AUC at least ``min_auc`` and beyond what
chance gives on a window of this size (:func:`chance_auc`, one-sided at ``z``): a noise-trained,
near-constant candidate can beat a confident serving model on log loss, never on both. Too few
samples, a single class, a failed fit or non-finite output end the job with ``status: failed`` and
a reason; the serving model is never touched by this process (it only reads it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from training import features
from training.evaluate import write_feature_importance
from training.metadata import FEATURE_IMPORTANCE_FILE, ModelMetadata, sha256_file
from training.onnx_export import export_onnx
from training.pipeline import atomic_directory
from training.trainers import DEFAULT_PARAMS, MODEL_CLASSES, TreeModel, make_model
from xylen_server.settings import Settings

logger = logging.getLogger(__name__)

MIN_SAMPLES = 100
"""Fewest new samples any retrain accepts."""


class JobFailed(RuntimeError):
    """The job cannot produce a trustworthy candidate; the message is the reason."""


@dataclass(frozen=True)
class JobSpec:
    """What the server asks one job to do (``spec.json``)."""

    job_id: str
    samples: str
    """The feedback store's directory (read without its lock, see :func:`read_samples`), or a
    Parquet file of samples in the FeedbackStore schema."""
    serving_dir: str
    """The serving model's kept directory (read only)."""
    candidate_dir: str
    """Where to write the candidate model directory (only when the gate passes)."""
    result: str
    """Where to write the result JSON."""
    mode: str
    """``incremental`` or ``full``."""
    version: int
    """Version to give the candidate."""
    # Defaults come from the server's settings: one source of truth (see Settings.retrain_*).
    min_samples: int = Settings.retrain_min_samples
    holdout_fraction: float = Settings.retrain_holdout_fraction
    margin: float = Settings.retrain_gate_margin
    min_auc: float = Settings.retrain_gate_min_auc
    z: float = Settings.retrain_gate_z
    """Confidence (normal quantile) that the candidate's AUC is not chance."""
    threads: int = Settings.retrain_threads
    nice: int = Settings.retrain_nice
    cutoff_ms: int = 0
    """Samples received after this (UTC ms) are new to the serving model."""

    @classmethod
    def read(cls, path: Path) -> JobSpec:
        return cls(**json.loads(Path(path).read_text()))

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def progress(stage: str, message: str) -> None:
    """One progress line for the server."""
    print(json.dumps({"stage": stage, "message": message}), flush=True)


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary log loss (natural log), probabilities clipped to [1e-15, 1 - 1e-15]."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-15, 1 - 1e-15)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (ties count half)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def chance_auc(y: np.ndarray, z: float) -> float:
    """The AUC a model with no skill exceeds with one-sided probability ~Phi(-z) on labels ``y``
    (normal approximation of the Mann-Whitney statistic under the null: SE^2 =
    (n + 1) / (12 n1 n0)). On a small window a lucky noise model reaches 0.56; this bound keeps
    it out."""
    n1 = int(np.sum(y))
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return 1.0
    return 0.5 + z * math.sqrt((len(y) + 1) / (12.0 * n1 * n0))


def gate(
    y: np.ndarray,
    serving: np.ndarray,
    candidate: np.ndarray,
    margin: float,
    min_auc: float,
    z: float = 1.645,
) -> dict[str, Any]:
    """Score both models on the same held-out rows and decide (see the module docstring)."""
    for name, p in (("serving model", serving), ("candidate", candidate)):
        if not np.isfinite(p).all():
            raise JobFailed(f"the {name} produced non-finite probabilities on the held-out window")
    verdict: dict[str, Any] = {
        "holdout_samples": len(y),
        "serving_log_loss": log_loss(y, serving),
        "candidate_log_loss": log_loss(y, candidate),
        "serving_auc": auc(y, serving),
        "candidate_auc": auc(y, candidate),
        "margin": margin,
        "min_auc": max(min_auc, chance_auc(y, z)),
    }
    loss_ok = verdict["candidate_log_loss"] <= verdict["serving_log_loss"] + margin
    auc_ok = verdict["candidate_auc"] >= verdict["min_auc"]
    verdict["passed"] = bool(loss_ok and auc_ok)
    scores = (
        f"log loss {verdict['candidate_log_loss']:.4f} vs serving "
        f"{verdict['serving_log_loss']:.4f} (margin {margin:g}), AUC "
        f"{verdict['candidate_auc']:.4f} vs serving {verdict['serving_auc']:.4f} "
        f"(needed {verdict['min_auc']:.3f}) on {len(y)} held-out samples"
    )
    if verdict["passed"]:
        verdict["reason"] = f"candidate not worse: {scores}"
    elif not loss_ok:
        verdict["reason"] = f"candidate worse than the serving model: {scores}"
    else:
        verdict["reason"] = f"candidate learned too little: {scores}"
    return verdict


def read_samples(path: Path) -> pl.DataFrame:
    """Every sample in a feedback store directory, read while the server keeps appending and
    compacting: WAL segments first (up to a torn tail), then the Parquet parts, then one row
    per prediction id. A segment compacted away meanwhile has its records in a part written
    before the segment was deleted, so the parts listed afterwards hold them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xylen_server.learning.feedback_store import SCHEMA, read_segment, records_table

    path = Path(path)
    if path.is_file():
        return pl.read_parquet(path)
    records = []
    for segment in sorted((path / "feedback_wal").glob("wal-*.log")):
        try:
            records.extend(read_segment(segment))
        except (FileNotFoundError, OSError):
            continue
    tables = [records_table(records)]
    for part in sorted((path / "training_samples").glob("part-*.parquet")):
        tables.append(pq.read_table(part, schema=SCHEMA))
    frame = pl.from_arrow(pa.concat_tables(tables))
    assert isinstance(frame, pl.DataFrame)
    return frame.unique(subset="prediction_id", keep="first", maintain_order=True)


def feature_matrix(frame: pl.DataFrame, width: int) -> np.ndarray:
    """The ``features`` list column as a float32 (rows, width) matrix."""
    if frame.height == 0:
        return np.empty((0, width), dtype=np.float32)
    flat = frame.get_column("features").explode().to_numpy()
    return np.ascontiguousarray(flat.reshape(frame.height, width), dtype=np.float32)


def history_rows(meta: ModelMetadata) -> tuple[np.ndarray, np.ndarray, str]:
    """The serving model's own training data (its kline files, featurised and labelled as
    training did), or empty arrays and a note when the files are not all there any more."""
    from training.klines import interval_ms, load_klines
    from training.labels import binary_labels

    files = [Path(f["path"]) for f in meta.data.get("files", []) if isinstance(f, dict)]
    empty = np.empty((0, len(meta.feature_names)), np.float32), np.empty(0, np.int64)
    if not files:
        return (*empty, "no history files in the metadata")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        return (*empty, f"history files missing ({missing[0]}, ...)")
    klines = load_klines(files, interval=meta.interval or None)
    candles = features.candles_from_frame(klines.frame)
    x = features.compute_features(candles)
    y = binary_labels(
        candles["open_time"],
        candles["close"],
        horizon=meta.horizon,
        step_ms=interval_ms(klines.interval),
        fee=meta.fee,
        threshold=meta.label_threshold,
    )
    keep = np.isfinite(x).all(axis=1) & np.isfinite(y)
    return (
        x[keep].astype(np.float32),
        y[keep].astype(np.int64),
        f"{int(keep.sum())} history rows from {len(files)} files",
    )


def _check_classes(name: str, y: np.ndarray) -> None:
    classes = np.unique(y)
    if len(classes) < 2:
        raise JobFailed(
            f"every {name} label is {int(classes[0]) if len(classes) else '?'}; a single class "
            "cannot be learned or scored"
        )


def _split_valid(n: int) -> int:
    """Rows at the end of a training set used for early stopping."""
    return max(20, int(n * 0.15)) if n >= 120 else 0


def _params(meta: ModelMetadata, n_train: int) -> dict[str, Any]:
    params = {
        k: v
        for k, v in meta.params.items()
        if k in DEFAULT_PARAMS[meta.model_type] and k not in ("n_estimators",)
    }
    if meta.model_type == "lightgbm":
        # Small feedback sets: a leaf needs a share of the rows, not the default 100.
        params["min_data_in_leaf"] = max(5, min(100, n_train // 20))
    return params


def _incremental(
    spec: JobSpec, serving_dir: Path, meta: ModelMetadata, x: np.ndarray, y: np.ndarray
) -> TreeModel:
    import lightgbm as lgb

    from training.trainers import LightGBMModel

    n_valid = _split_valid(len(y))
    tr = slice(0, len(y) - n_valid)
    params = {
        **DEFAULT_PARAMS["lightgbm"],
        **_params(meta, len(y) - n_valid),
        "objective": "binary",
        "metric": "binary_logloss",
        "seed": 42,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": spec.threads,
        "verbosity": -1,
    }
    for key in ("n_estimators", "early_stopping_rounds"):
        params.pop(key, None)
    init = lgb.Booster(model_file=str(serving_dir / meta.native_file))
    start = init.current_iteration()
    train = lgb.Dataset(x[tr], y[tr], feature_name=list(meta.feature_names), free_raw_data=True)
    callbacks: list[Any] = []
    valid_sets = []
    if n_valid:
        valid_sets = [lgb.Dataset(x[-n_valid:], y[-n_valid:], reference=train)]
        callbacks = [lgb.early_stopping(20, verbose=False)]
    booster = lgb.train(
        params,
        train,
        num_boost_round=100,
        init_model=init,
        valid_sets=valid_sets,
        callbacks=callbacks,
    )
    best = booster.best_iteration or booster.current_iteration()
    model = LightGBMModel(params={}, feature_names=list(meta.feature_names), num_threads=1)
    model.booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
    model.best_iteration = best
    logger.info("continued %d trees to %d", start, best)
    return model


def _full(spec: JobSpec, meta: ModelMetadata, x: np.ndarray, y: np.ndarray) -> TreeModel:
    n_valid = _split_valid(len(y))
    if not n_valid:
        raise JobFailed(f"only {len(y)} training rows; a full retrain needs at least 120")
    model = make_model(
        meta.model_type,
        _params(meta, len(y) - n_valid),
        feature_names=list(meta.feature_names),
        seed=int(meta.params.get("seed", 42)),
        num_threads=spec.threads,
    )
    model.fit(x[:-n_valid], y[:-n_valid], x[-n_valid:], y[-n_valid:])
    return model


def run(spec: JobSpec) -> dict[str, Any]:
    """Do the job; returns the result (also for a failure, with ``status: failed``)."""
    started = time.perf_counter()
    serving_dir = Path(spec.serving_dir)
    meta = ModelMetadata.read(serving_dir)
    width = len(meta.feature_names)
    progress("snapshot", "reading the feedback samples")
    frame = read_samples(Path(spec.samples))
    frame = frame.filter(pl.col("features").list.len() == width).sort(
        ["close_time", "received_time"]
    )
    received = frame.get_column("received_time").dt.epoch("ms").to_numpy()
    new = frame.filter(pl.Series(received > spec.cutoff_ms))
    required = max(MIN_SAMPLES, spec.min_samples)
    if new.height < required:
        raise JobFailed(
            f"too few samples: {new.height} new samples of this model's {width} features since "
            f"its cut-off, need at least {required}"
        )
    n_holdout = max(1, math.ceil(new.height * spec.holdout_fraction))
    holdout = new.tail(n_holdout)
    x_ho = feature_matrix(holdout, width)
    y_ho = holdout.get_column("label").to_numpy().astype(np.int64)
    _check_classes("held-out", y_ho)
    cutoff_ms = int(received.max()) if len(received) else spec.cutoff_ms

    mode = spec.mode
    if mode == "incremental" and meta.model_type != "lightgbm":
        mode = "full"
        progress("training", f"{meta.model_type} has no continued training; training in full")
    note = ""
    if mode == "incremental":
        pool = new.head(new.height - n_holdout)
        x, y = feature_matrix(pool, width), pool.get_column("label").to_numpy().astype(np.int64)
    else:
        holdout_ids = set(holdout.get_column("prediction_id").to_list())
        pool = frame.filter(~pl.col("prediction_id").is_in(list(holdout_ids)))
        x_fb = feature_matrix(pool, width)
        y_fb = pool.get_column("label").to_numpy().astype(np.int64)
        x_hist, y_hist, note = history_rows(meta)
        x, y = np.concatenate([x_hist, x_fb]), np.concatenate([y_hist, y_fb])
    _check_classes("training", y)
    progress(
        "training",
        f"{mode} on {len(y)} rows ({new.height} new samples, {n_holdout} held out)"
        + (f"; {note}" if note else ""),
    )
    try:
        if mode == "incremental":
            candidate = _incremental(spec, serving_dir, meta, x, y)
        else:
            candidate = _full(spec, meta, x, y)
    except JobFailed:
        raise
    except Exception as exc:
        raise JobFailed(f"training failed: {type(exc).__name__}: {exc}") from exc

    progress("validating", f"scoring candidate and v{meta.version} on {n_holdout} held-out rows")
    serving = MODEL_CLASSES[meta.model_type].load(serving_dir, list(meta.feature_names))
    verdict = gate(
        y_ho,
        serving.predict_proba(x_ho),
        candidate.predict_proba(x_ho),
        spec.margin,
        spec.min_auc,
        spec.z,
    )
    result: dict[str, Any] = {
        "status": "ok",
        "mode": mode,
        "samples": int(new.height),
        "training_rows": len(y),
        "gate": verdict,
        "candidate_version": spec.version,
        "seconds": time.perf_counter() - started,
    }
    if verdict["passed"]:
        progress("writing", f"writing candidate v{spec.version}")
        _write_candidate(spec, meta, candidate, mode, len(y), new.height, cutoff_ms, verdict)
    result["seconds"] = time.perf_counter() - started
    return result


def _write_candidate(
    spec: JobSpec,
    meta: ModelMetadata,
    candidate: TreeModel,
    mode: str,
    training_rows: int,
    samples: int,
    cutoff_ms: int,
    verdict: dict[str, Any],
) -> None:
    data = dict(meta.data)
    data["feedback"] = {
        "received_until_ms": cutoff_ms,
        "new_samples": samples,
        "mode": mode,
        "job_id": spec.job_id,
    }
    new_meta = replace(
        meta,
        version=spec.version,
        parent_version=meta.version,
        training_samples=training_rows,
        trained_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        data=data,
        metrics={**meta.metrics, "gate": verdict, "retrain_mode": mode},
        checksums={},
    )
    with atomic_directory(Path(spec.candidate_dir)) as tmp:
        native = candidate.save(tmp)
        write_feature_importance(tmp / FEATURE_IMPORTANCE_FILE, candidate.feature_importance())
        replace(new_meta, checksums={native.name: sha256_file(native)}).write(tmp)
        export_onnx(tmp)


def main(argv: list[str] | None = None) -> int:
    """Run the job described by ``argv[0]`` (spec.json); exit 0 when a result was written."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec = JobSpec.read(Path(args[0]))
    if os.nice(0) < spec.nice:  # not started through retrain_launch
        from xylen_server.learning.launch import lower_priority

        lower_priority(spec.nice - os.nice(0))
    try:
        result = run(spec)
    except JobFailed as exc:
        result = {"status": "failed", "message": str(exc)}
    except Exception as exc:  # anything else is a failed run too, never a promoted model
        logger.exception("retrain job crashed")
        result = {"status": "failed", "message": f"job crashed: {type(exc).__name__}: {exc}"}
    Path(spec.result).write_text(json.dumps(result, indent=2) + "\n")
    progress("done", result.get("message", "") or result["gate"]["reason"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
