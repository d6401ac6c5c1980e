"""The job's work, imported only once the job runs at its niceness (see ``__main__``).

Samples: feedback rows of this model's feature width, ordered by close time. *New* samples are
those received after the serving model's cut-off (``metadata.data.feedback.received_until_ms``).

What the gate trusts: the held-out window is the most recent ``holdout_fraction`` of the new
samples *from authenticated callers* (admin token or allowed mTLS identity; their ``source`` is
not ``anonymous``, see :mod:`xylen_server.auth`). Samples from unauthenticated callers (possible
only while the admin RPCs are open: loopback or ``ALLOW_INSECURE_ADMIN``) may be trained on but
are never scored on, so nobody can promote a model by also writing the answers it is graded
against; with no trusted new sample the job fails and the serving model stays. The window is
never trained on, nor is any untrusted sample newer than its start; and between the rows trained
on and the window lies a gap of the model's label horizon: a sample whose outcome closed within
``horizon`` bars of the window's first, or after it, is purged from training, whoever sent it,
and so is a history row (full mode) from that time on. A label is the move over the ``horizon``
bars up to its close, so such a sample's label shares prices with the window's first labels;
features only look backwards, so the gap needs nothing more (``make train``'s splits add the
feature lookback, which keeps validation features off training candles; :func:`purge_before`).

* incremental: the serving model continues training (:meth:`TreeModel.finetune
  <training.trainers.TreeModel.finetune>`) on the new samples before the window, early-stopped
  on their most recent part. A model type without continued training falls back to full.

The early-stopping rows are the most recent 15 % (at least 20) of the rows trained on, and they
get the window's gap too (:func:`early_stopping_split`, the same :func:`purge_before`): a row
whose outcome closed within ``horizon`` bars of the first stopping row is used for neither, or
the number of trees would be chosen on labels that share prices with the rows fitted. When the
gap leaves nothing of both classes to fit on (or with fewer than 120 rows), incremental training
continues without early stopping on every row, and full training fails with the reason.
* full: a fresh model of the serving model's type and parameters on the history (the kline files
  named in the serving model's metadata, featurised and labelled as training did, when they are
  all still there) plus every feedback sample before the window.

Both models are then scored on the window by the gate (:func:`~xylen_server.learning.gate.gate`);
only a passing candidate is written (:func:`training.trainers.write_model_dir`). Too few samples,
a single class, a failed fit or non-finite output end the job with ``status: failed`` and a
reason; the serving model is never touched by this process (it only reads it).

Calibration and thresholds: a candidate keeps its parent's ``calibration`` (the Platt map of
:mod:`training.calibration`) and ``signal_thresholds`` unchanged; they are not refitted. The
only recent rows with trusted labels are the gate's held-out window, and fitting the map on the
rows the candidate is graded on would grade it on its own answers; the thresholds are on the
parent's calibrated scale and stay consistent only with the parent's map. The price: if a
retrain shifts the raw scores, the candidate's served probabilities are calibrated by the
parent's map until the model is trained again with ``make train`` (which refits both).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from training import features
from training.metadata import ModelMetadata
from training.trainers import (
    DEFAULT_PARAMS,
    MIN_TRAINING_SAMPLES,
    MODEL_CLASSES,
    TreeModel,
    make_model,
    write_model_dir,
)
from xylen_server.auth import ANONYMOUS
from xylen_server.learning.gate import GateError, gate
from xylen_server.learning.job import JobFailed, JobSpec, progress
from xylen_server.learning.samples import read_samples

logger = logging.getLogger(__name__)


def feature_matrix(frame: pl.DataFrame, width: int) -> np.ndarray:
    """The ``features`` list column as a float32 (rows, width) matrix."""
    if frame.height == 0:
        return np.empty((0, width), dtype=np.float32)
    flat = frame.get_column("features").explode().to_numpy()
    return np.ascontiguousarray(flat.reshape(frame.height, width), dtype=np.float32)


def history_rows(
    meta: ModelMetadata, model_dir: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The serving model's own training data (its kline files, featurised and labelled as
    training did): features, labels, each row's outcome close time (ms) and a note. A model whose
    metadata lists no files (imported from elsewhere) has none: empty arrays and a note saying
    so. A listed file that is missing or changed fails the job with its path named: a full
    retrain never quietly trains on less than the model was."""
    from training.klines import interval_ms, load_klines
    from training.labels import binary_labels
    from training.metadata import history_files, history_missing_message, sha256_file

    files = history_files(meta, model_dir)
    empty = (
        np.empty((0, len(meta.feature_names)), np.float32),
        np.empty(0, np.int64),
        np.empty(0, np.int64),
    )
    if not files:
        return (*empty, "no history files in the metadata")
    missing = [f for f in files if not f.exists]
    if missing:
        raise JobFailed(history_missing_message(missing, len(files)))
    for f in files:
        if f.sha256 and sha256_file(f.path) != f.sha256:
            raise JobFailed(
                f"history file {f.path} changed since training (sha256 differs from the "
                "metadata); a full retrain would not learn from the model's own data"
            )
    # The policy the model was trained with (a model trained keeping anomalous bars was rebuilt
    # from other candles, features and labels under the default, dropping them).
    policy = str(meta.data.get("anomaly_policy") or "drop")
    klines = load_klines([f.path for f in files], interval=meta.interval or None, policy=policy)
    candles = features.candles_from_frame(klines.frame)
    x = features.FeatureSet.of(meta.feature_names, meta.lookback).compute(candles)
    step = interval_ms(klines.interval)
    y = binary_labels(
        candles["open_time"],
        candles["close"],
        horizon=meta.horizon,
        step_ms=step,
        fee=meta.fee,
        threshold=meta.label_threshold,
    )
    keep = np.isfinite(x).all(axis=1) & np.isfinite(y)
    return (
        x[keep].astype(np.float32),
        y[keep].astype(np.int64),
        # The close time of the bar whose close each label reads (``horizon`` bars on): the
        # row's outcome, in the same terms as a feedback sample's close time.
        np.asarray(candles["open_time"], dtype=np.int64)[keep] + (meta.horizon + 1) * step - 1,
        f"{int(keep.sum())} history rows from {len(files)} files",
    )


def purge_before(meta: ModelMetadata, window_start_ms: int, close_ms: np.ndarray) -> int:
    """The close time (ms) a row trained on must lie before when the gate's window begins with
    an outcome that closed at ``window_start_ms``: the model's label horizon in bars earlier. A
    model without an interval in its metadata (imported, or written by hand) takes the shortest
    step between the samples' distinct close times ``close_ms`` as its bar (one bar when
    outcomes come one a bar; outcomes closing together make it shorter: name the interval)."""
    from training.klines import interval_ms

    if meta.interval:
        step = interval_ms(meta.interval)
    else:
        steps = np.diff(np.unique(close_ms))
        step = int(steps.min()) if len(steps) else 0
    return window_start_ms - meta.horizon * step


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


def early_stopping_split(
    meta: ModelMetadata, close_ms: np.ndarray, step_from: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """The rows (indices into ``close_ms``, each row's outcome close time) to fit on and to stop
    early on, and how many were purged between them. The stopping rows are the most recent
    :func:`_split_valid` rows; the rows fitted on are the older ones whose outcome closed before
    :func:`purge_before` the first stopping row, the same gap as before the gate's window (the
    bar taken from ``step_from``, the samples' close times, when the model names none): a label
    closing within ``horizon`` bars of the first stopping label shares its prices, and would
    pick the number of trees with look-ahead. No stopping rows (too few rows): all are fitted
    on, none purged."""
    close_ms = np.asarray(close_ms, dtype=np.int64)
    order = np.argsort(close_ms, kind="stable")
    n_valid = _split_valid(len(order))
    if not n_valid:
        return order, order[:0], 0
    valid, older = order[-n_valid:], order[:-n_valid]
    cut = purge_before(meta, int(close_ms[valid].min()), step_from)
    fit = older[close_ms[older] < cut]
    return fit, valid, len(older) - len(fit)


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


def _stoppable(y: np.ndarray, fit: np.ndarray, valid: np.ndarray) -> bool:
    """Whether the rows left to fit on (after the purge) can be learned: both classes."""
    return len(valid) > 0 and len(np.unique(y[fit])) == 2


def _incremental(
    spec: JobSpec,
    serving_dir: Path,
    meta: ModelMetadata,
    x: np.ndarray,
    y: np.ndarray,
    fit: np.ndarray,
    valid: np.ndarray,
) -> TreeModel:
    model = MODEL_CLASSES[meta.model_type].load(serving_dir, list(meta.feature_names))
    start = model.best_iteration
    model.num_threads = spec.threads
    if len(valid):
        model.params.update(_params(meta, len(fit)))
        model.finetune(x[fit], y[fit], x[valid], y[valid])
    else:  # too few rows, or nothing learnable left before the stopping rows' gap
        model.params.update(_params(meta, len(y)))
        model.finetune(x, y)
    logger.info("continued %s trees to %s", start, model.best_iteration)
    return model


def _full(
    spec: JobSpec,
    meta: ModelMetadata,
    x: np.ndarray,
    y: np.ndarray,
    fit: np.ndarray,
    valid: np.ndarray,
) -> TreeModel:
    if not len(valid):
        raise JobFailed(f"only {len(y)} training rows; a full retrain needs at least 120")
    if not _stoppable(y, fit, valid):
        raise JobFailed(
            f"only {len(fit)} of {len(y)} training rows closed before the {meta.horizon}-bar "
            f"gap before the {len(valid)} most recent (early stopping), and they hold "
            f"{'no' if not len(fit) else 'a single'} class; a full retrain needs both"
        )
    model = make_model(
        meta.model_type,
        _params(meta, len(fit)),
        feature_names=list(meta.feature_names),
        seed=int(meta.params.get("seed", 42)),
        num_threads=spec.threads,
    )
    model.fit(x[fit], y[fit], x[valid], y[valid])
    return model


def _trusted() -> pl.Expr:
    """Samples from authenticated callers (a source other than anonymous; NULL is a sample
    stored before sources were recorded, untrusted)."""
    return pl.col("source").is_not_null() & (pl.col("source") != ANONYMOUS)


def run(spec: JobSpec) -> dict[str, Any]:
    """Do the job; returns the result (also for a failure, with ``status: failed``)."""
    started = time.perf_counter()
    serving_dir = Path(spec.serving_dir)
    meta = ModelMetadata.read(serving_dir)
    width = len(meta.feature_names)
    progress("snapshot", "reading the feedback samples")
    frame = read_samples(Path(spec.samples))
    frame = (
        frame.filter(pl.col("features").list.len() == width)
        .sort(["close_time", "received_time"])
        .with_row_index("_row")
    )
    received = frame.get_column("received_time").dt.epoch("ms").to_numpy()
    new = frame.filter(pl.Series(received > spec.cutoff_ms))
    required = max(MIN_TRAINING_SAMPLES, spec.min_samples)
    if new.height < required:
        raise JobFailed(
            f"too few samples: {new.height} new samples of this model's {width} features since "
            f"its cut-off, need at least {required}"
        )
    trusted_new = new.filter(_trusted())
    if trusted_new.height == 0:
        raise JobFailed(
            f"no trusted samples to score on: all {new.height} new samples came from "
            "unauthenticated callers, and the gate scores candidates only on feedback from "
            "authenticated ones; the serving model stays"
        )
    n_holdout = max(1, math.ceil(trusted_new.height * spec.holdout_fraction))
    holdout = trusted_new.tail(n_holdout)
    start = int(holdout.get_column("_row").min())  # type: ignore[arg-type]
    window_start = holdout.get_column("close_time").dt.epoch("ms").min()
    sample_closes = frame.get_column("close_time").dt.epoch("ms").to_numpy()
    purge_from = purge_before(meta, int(window_start), sample_closes)  # type: ignore[arg-type]
    # Never trained on: the window, an untrusted sample newer than the window's start, nor any
    # sample whose outcome closed in the gap before the window or after its start.
    closed = pl.col("close_time").dt.epoch("ms")
    excluded = (
        pl.col("prediction_id").is_in(holdout.get_column("prediction_id").implode())
        | (~_trusted() & (pl.col("_row") >= start))
        | (closed >= purge_from)
    )
    purged = frame.filter((closed >= purge_from) & (pl.col("_row") < start)).height
    x_ho = feature_matrix(holdout, width)
    y_ho = holdout.get_column("label").to_numpy().astype(np.int64)
    _check_classes("held-out", y_ho)
    cutoff_ms = int(received.max()) if len(received) else spec.cutoff_ms

    mode = spec.mode
    if mode == "incremental" and not MODEL_CLASSES[meta.model_type].can_finetune:
        mode = "full"
        progress("training", f"{meta.model_type} has no continued training; training in full")
    note = ""
    if mode == "incremental":
        pool = new.filter(~excluded)
        x, y = feature_matrix(pool, width), pool.get_column("label").to_numpy().astype(np.int64)
        closes = pool.get_column("close_time").dt.epoch("ms").to_numpy()
    else:
        pool = frame.filter(~excluded)
        x_fb = feature_matrix(pool, width)
        y_fb = pool.get_column("label").to_numpy().astype(np.int64)
        x_hist, y_hist, closed_hist, note = history_rows(meta, serving_dir)
        before = closed_hist < purge_from
        x, y = np.concatenate([x_hist[before], x_fb]), np.concatenate([y_hist[before], y_fb])
        closes = np.concatenate(
            [closed_hist[before], pool.get_column("close_time").dt.epoch("ms").to_numpy()]
        )
    if len(y) == 0:
        raise JobFailed(
            f"nothing to train on: the {purged} samples before the held-out window all closed "
            f"within the {meta.horizon}-bar gap before it, where "
            "labels overlap the window's (outcomes that all close at once share one future)"
        )
    _check_classes("training", y)
    fit, valid, purged_stopping = early_stopping_split(meta, closes, sample_closes)
    if mode == "incremental" and not _stoppable(y, fit, valid):
        fit, valid, purged_stopping = np.arange(len(y)), np.arange(0), 0
    used = len(fit) + len(valid)
    progress(
        "training",
        f"{mode} on {used} rows ({new.height} new samples, {trusted_new.height} from "
        f"authenticated callers, {n_holdout} of those held out, {purged} in the "
        f"{meta.horizon}-bar gap before them purged; early stopping on the {len(valid)} most "
        f"recent, {purged_stopping} in the gap before those purged)"
        + (f"; {note}" if note else ""),
    )
    try:
        if mode == "incremental":
            candidate = _incremental(spec, serving_dir, meta, x, y, fit, valid)
        else:
            candidate = _full(spec, meta, x, y, fit, valid)
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
    ).as_dict()
    result: dict[str, Any] = {
        "status": "ok",
        "mode": mode,
        "samples": int(new.height),
        "training_rows": used,
        "purged_before_window": purged,
        "early_stopping_rows": len(valid),
        "purged_before_stopping": purged_stopping,
        "trees": int(candidate.best_iteration or 0),
        "gate": verdict,
        "candidate_version": spec.version,
        "seconds": time.perf_counter() - started,
    }
    if verdict["passed"]:
        progress("writing", f"writing candidate v{spec.version}")
        _write_candidate(spec, meta, candidate, mode, used, new.height, cutoff_ms, verdict)
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
    write_model_dir(Path(spec.candidate_dir), candidate, new_meta)


def run_and_report(spec: JobSpec) -> int:
    """Run the job, write ``result.json`` (a failure too) and the final progress line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        result = run(spec)
    except (JobFailed, GateError) as exc:
        result = {"status": "failed", "message": str(exc)}
    except Exception as exc:  # anything else is a failed run too, never a promoted model
        logger.exception("retrain job crashed")
        result = {"status": "failed", "message": f"job crashed: {type(exc).__name__}: {exc}"}
    Path(spec.result).write_text(json.dumps(result, indent=2) + "\n")
    progress("done", result.get("message", "") or result["gate"]["reason"])
    return 0
