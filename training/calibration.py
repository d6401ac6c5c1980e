"""Probability calibration: Platt scaling of a model's P(up), fitted on its validation split.

Why. Tree models trained with early stopping on a rare-ish, noisy label give scores that rank
bars but are not frequencies: on hourly bars a model's raw P(up net of fees) can sit far from
the up share it predicts. The coordinator averages P(up) across models, so a model whose scores
are squeezed towards 0.37 and one whose scores spread wide would not mean the same thing. A
calibrated probability means "of the bars given 0.4, about 40 % went up (net of the fee)".

The map (:data:`METHOD` ``"platt"``): ``q = sigmoid(a * logit(p) + b)``, two floats fitted by
maximum likelihood (Newton's method, a tiny ridge) on the validation probabilities and labels.
``a`` is kept strictly positive, so the map is strictly increasing: it never reorders bars,
AUC is unchanged, and a threshold on ``q`` selects exactly the bars the corresponding
threshold on ``p`` would (the signal rule of :mod:`training.thresholds` is applied to ``q``).
Isotonic regression was not chosen: it is a step function, so it ties distinct raw scores and
would change which bars a share-based threshold selects, and it overfits a validation split of
a few thousand noisy rows.

The metadata's ``calibration`` holds ``{"method": "platt", "a": .., "b": .., "validation":
{..}}``; empty (models trained before calibration) means the identity. Training and the server
both call :func:`apply` (one source of truth); the ONNX-vs-native parity checks compare raw
engine outputs, before calibration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

#: The only calibration method written and served.
METHOD = "platt"
#: Smallest slope ``a`` kept: the map stays strictly increasing even on a useless model.
MIN_SLOPE = 1e-3
#: Probabilities are clipped this far from 0 and 1 before the logit.
EPS = 1e-7
#: Bins of :func:`expected_calibration_error`.
ECE_BINS = 10
#: Fewest validation rows a calibration is fitted on.
MIN_ROWS = 50
#: Ridge on (a - 1, b): keeps the fit finite on separable or constant scores.
_RIDGE = 1e-6


class CalibrationError(ValueError):
    """The calibration cannot be fitted (too few rows, one class) or is malformed."""


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(q) - np.log1p(-q)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def fit_platt(proba: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> dict[str, Any]:
    """``{"method": "platt", "a", "b"}`` fitted on probabilities and 0/1 labels (rows with a
    non-finite value are ignored)."""
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    known = np.isfinite(p) & np.isfinite(y)
    p, y = p[known], y[known]
    if len(p) < MIN_ROWS:
        raise CalibrationError(f"{len(p)} rows cannot fit a calibration (need {MIN_ROWS})")
    if y.min() == y.max():
        raise CalibrationError(f"every calibration label is {int(y[0])}; need both classes")
    z = _logit(p)
    design = np.column_stack([z, np.ones_like(z)])
    theta = np.array([1.0, 0.0])
    prior = theta.copy()
    n = len(z)
    for _ in range(max_iter):
        q = _sigmoid(design @ theta)
        grad = design.T @ (q - y) / n + _RIDGE * (theta - prior)
        w = q * (1.0 - q)
        hess = (design * w[:, None]).T @ design / n + _RIDGE * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        theta[0] = max(theta[0], MIN_SLOPE)
        if float(np.abs(step).max()) < 1e-10:
            break
    a, b = float(theta[0]), float(theta[1])
    if not (math.isfinite(a) and math.isfinite(b)):
        raise CalibrationError("the calibration fit did not converge")
    return {"method": METHOD, "a": a, "b": b}


def check(calibration: Mapping[str, Any]) -> None:
    """Raise :class:`CalibrationError` unless ``calibration`` is empty or a valid Platt map."""
    if not calibration:
        return
    method = calibration.get("method")
    if method != METHOD:
        raise CalibrationError(f"calibration method {str(method)[:32]!r} is not {METHOD!r}")
    a, b = calibration.get("a"), calibration.get("b")
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise CalibrationError(f"calibration.{name} must be a number")
        if not math.isfinite(value) or abs(value) > 1e6:
            raise CalibrationError(f"calibration.{name} must be finite and at most 1e6 in size")
    if a <= 0:  # type: ignore[operator]
        raise CalibrationError(f"calibration.a must be > 0 (an increasing map), got {a}")


def apply(calibration: Mapping[str, Any], proba: np.ndarray) -> np.ndarray:
    """Calibrated probabilities (float64); the identity when ``calibration`` is empty."""
    p = np.asarray(proba, dtype=np.float64)
    if not calibration:
        return p
    a, b = float(calibration["a"]), float(calibration["b"])
    return _sigmoid(a * _logit(p) + b)


def apply_one(calibration: Mapping[str, Any], p: float) -> float:
    """:func:`apply` of one probability, bit for bit: the same numpy functions (``log``,
    ``log1p``, ``tanh``) on the one value, the clip and the arithmetic in Python floats (the
    same IEEE operations in the same order). A served row answered alone takes this instead of
    ten numpy calls on a one-element array."""
    if not calibration:
        return p
    a, b = float(calibration["a"]), float(calibration["b"])
    q = min(max(p, EPS), 1.0 - EPS)  # np.clip's order: a NaN stays NaN
    z = float(np.log(q)) - float(np.log1p(-q))
    return 0.5 * (1.0 + float(np.tanh(0.5 * (a * z + b))))


def brier_score(proba: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared difference between P(up) and the 0/1 label."""
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean((p - y) ** 2))


def expected_calibration_error(
    proba: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE over ``bins`` equal-width bins of [0, 1]: the row-weighted mean of
    |mean P(up) - up share| per bin."""
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if not len(p):
        return float("nan")
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for k in range(bins):
        in_bin = index == k
        count = int(in_bin.sum())
        if count:
            total += count * abs(float(p[in_bin].mean()) - float(y[in_bin].mean()))
    return total / len(p)


def report(raw: np.ndarray, labels: np.ndarray, calibration: Mapping[str, Any]) -> dict[str, float]:
    """Brier score and ECE of the raw and the calibrated probabilities on one period."""
    p = np.asarray(raw, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    known = np.isfinite(p) & np.isfinite(y)
    p, y = p[known], y[known]
    q = apply(calibration, p)
    return {
        "samples": len(p),
        "brier_raw": brier_score(p, y),
        "brier_calibrated": brier_score(q, y),
        "ece_raw": expected_calibration_error(p, y),
        "ece_calibrated": expected_calibration_error(q, y),
    }
