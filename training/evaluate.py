"""Metrics beside honest baselines, feature importance, and leakage checks.

A model is only interesting where it beats the baselines on data it never saw: the majority class
(a constant probability, the training base rate) and the previous return (momentum: P(up) given
the sign of the last one-bar return, both estimated on the training rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score

#: Probabilities are clipped to [_EPS, 1 - _EPS] before the log loss.
_EPS = 1e-15


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary log loss (natural log), probabilities clipped to [1e-15, 1 - 1e-15]. The one
    log loss of xylen: training reports it, the retrain gate compares models on it."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (ties count half); needs both classes in ``y``."""
    return float(roc_auc_score(y, p))


def classification_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    """Accuracy, precision, recall (at P(up) > 0.5), AUC and log loss; None where undefined."""
    y = np.asarray(y, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    pred = (proba > 0.5).astype(np.int64)
    both = len(np.unique(y)) == 2
    return {
        "samples": len(y),
        "positive_rate": float(y.mean()) if len(y) else None,
        "accuracy": float(accuracy_score(y, pred)) if len(y) else None,
        "precision": float(precision_score(y, pred, zero_division=0)) if len(y) else None,
        "recall": float(recall_score(y, pred, zero_division=0)) if len(y) else None,
        "auc": auc(y, proba) if both else None,
        "log_loss": log_loss(y, proba) if len(y) else None,
    }


def baseline_probabilities(
    y_train: np.ndarray, prev_return_train: np.ndarray, prev_return: np.ndarray
) -> dict[str, np.ndarray]:
    """P(up) of the majority-class and previous-return baselines for the rows of ``prev_return``."""
    base_rate = float(np.mean(y_train))
    up = prev_return_train > 0
    p_after_up = float(np.mean(y_train[up])) if up.any() else base_rate
    p_after_down = float(np.mean(y_train[~up])) if (~up).any() else base_rate
    return {
        # The base rate as a constant: predicts the majority class at 0.5, has AUC 0.5.
        "majority_class": np.full(len(prev_return), base_rate),
        "previous_return": np.where(prev_return > 0, p_after_up, p_after_down),
    }


def evaluate_split(
    proba: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    baselines: Mapping[str, Mapping[str, np.ndarray]],
) -> dict[str, Any]:
    """``{period: {"model": metrics, "<baseline>": metrics}}`` for each evaluated period."""
    report: dict[str, Any] = {}
    for period, p in proba.items():
        y = labels[period]
        report[period] = {"model": classification_metrics(y, p)}
        for name, bp in baselines[period].items():
            report[period][name] = classification_metrics(y, bp)
    return report


def find_lookahead(
    featurise: Callable[[Mapping[str, np.ndarray]], np.ndarray],
    candles: Mapping[str, np.ndarray],
    feature_names: list[str] | tuple[str, ...],
    *,
    probes: int = 20,
    seed: int = 0,
) -> list[str]:
    """Names of the features whose value at a row changes when later candles are removed.

    A backward-looking feature of row ``i`` is the same whether or not candles after ``i`` exist;
    a feature that peeks at the future (for example one shifted forward by a bar) is not. Probes
    ``probes`` random rows plus the last.
    """
    n = len(next(iter(candles.values())))
    full = featurise(candles)
    rng = np.random.default_rng(seed)
    rows = np.unique(np.append(rng.integers(n // 2, n - 1, size=probes), n - 2))
    leaking: set[str] = set()
    for i in rows:
        cut = featurise({k: v[: i + 1] for k, v in candles.items()})[i]
        same = (cut == full[i]) | (np.isnan(cut) & np.isnan(full[i]))
        leaking.update(name for name, ok in zip(feature_names, same, strict=True) if not ok)
    return [name for name in feature_names if name in leaking]


def shuffled_label_auc(
    fit_predict: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    seed: int = 0,
) -> float:
    """Test AUC of a model fitted on permuted training labels: near 0.5 unless something leaks."""
    shuffled = np.random.default_rng(seed).permutation(y_train)
    auc = roc_auc_score(y_test, fit_predict(x_train, shuffled, x_test))
    return float(auc) if math.isfinite(auc) else 0.5
