"""Platt calibration (training/calibration.py): a miscalibrated score becomes calibrated, the
map is strictly increasing so thresholds chosen on calibrated probabilities select the same
bars, the metadata keeps it (and refuses a bad one), and no calibration is the identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training import calibration as C
from training.metadata import MetadataError, ModelMetadata
from training.thresholds import choose_thresholds, signal_masks


def _miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True P(up) ``t``, labels drawn from it, and an over-confident, shifted score of it."""
    rng = np.random.default_rng(seed)
    t = 1.0 / (1.0 + np.exp(-rng.normal(-0.5, 0.6, n)))
    y = (rng.random(n) < t).astype(np.int64)
    z = np.log(t) - np.log1p(-t)
    score = 1.0 / (1.0 + np.exp(-(2.5 * z + 0.9)))
    return t, y, score


def test_a_miscalibrated_score_becomes_calibrated() -> None:
    _, y_fit, s_fit = _miscalibrated(4000, seed=1)
    _, y, s = _miscalibrated(20000, seed=2)  # judged on rows it was not fitted on
    fitted = C.fit_platt(s_fit, y_fit)
    assert fitted["method"] == "platt"
    # The true inverse map is a = 1 / 2.5, b = -0.9 / 2.5.
    assert fitted["a"] == pytest.approx(0.4, abs=0.06)
    assert fitted["b"] == pytest.approx(-0.36, abs=0.12)
    before = C.report(s, y, {})
    after = C.report(s, y, fitted)
    assert before["ece_raw"] == before["ece_calibrated"]  # empty calibration: identity
    assert before["ece_raw"] > 0.1
    assert after["ece_calibrated"] < 0.02 < before["ece_raw"] / 5
    assert after["brier_calibrated"] < after["brier_raw"]
    q = C.apply(fitted, s)
    order = np.argsort(s, kind="stable")
    assert np.all(np.diff(q[order]) >= 0), "the map is monotonic: it never reorders rows"


def test_ece_and_brier_are_what_they_say() -> None:
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.55, 0.55])
    y = np.array([0, 0, 1, 1, 1, 0])
    # Bins: 0.0-0.1 (mean 0.05, up 0), 0.9-1.0 (0.95, 1), 0.5-0.6 (0.55, 0.5).
    assert C.expected_calibration_error(p, y) == pytest.approx((2 * 0.05 + 2 * 0.05 + 2 * 0.05) / 6)
    assert C.brier_score(p, y) == pytest.approx(np.mean((p - y) ** 2))


def test_a_useless_or_inverted_score_still_gets_an_increasing_map() -> None:
    rng = np.random.default_rng(3)
    s = rng.random(500)
    y = (s < 0.5).astype(np.int64)  # anti-correlated on purpose
    fitted = C.fit_platt(s, y)
    assert fitted["a"] >= C.MIN_SLOPE
    q = C.apply(fitted, np.sort(s))
    assert np.all(np.diff(q) >= 0)


def test_fit_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(C.CalibrationError, match="rows"):
        C.fit_platt(np.full(10, 0.3), np.zeros(10))
    with pytest.raises(C.CalibrationError, match="both classes"):
        C.fit_platt(np.full(100, 0.3), np.ones(100))


def test_thresholds_on_calibrated_probabilities_keep_the_signal_mix() -> None:
    t, y, raw = _miscalibrated(3000, seed=4)
    rng = np.random.default_rng(5)
    log_return = np.where(y == 1, 1.0, -1.0) * rng.exponential(0.004, len(y)) + 0.001 * (t - 0.4)
    fitted = C.fit_platt(raw, y)
    calibrated = C.apply(fitted, raw)
    on_raw = choose_thresholds(raw, log_return, fee=0.001)
    on_cal = choose_thresholds(calibrated, log_return, fee=0.001)
    masks_raw = signal_masks(raw, on_raw["buy"], on_raw["sell"])
    masks_cal = signal_masks(calibrated, on_cal["buy"], on_cal["sell"])
    for a, b in zip(masks_raw, masks_cal, strict=True):
        assert np.array_equal(a, b), "the same bars are BUY / SELL / HOLD on either scale"
    assert on_raw["validation"] == on_cal["validation"]
    assert on_cal["buy"] == pytest.approx(float(C.apply(fitted, np.array([on_raw["buy"]]))[0]))
    assert on_cal["sell"] == pytest.approx(float(C.apply(fitted, np.array([on_raw["sell"]]))[0]))


def _meta(**overrides: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "name": "m",
        "model_type": "lightgbm",
        "version": 1,
        "training_samples": 100,
        "trained_at": "2026-12-01T00:00:00Z",
        "feature_names": ["a", "b"],
        "lookback": 10,
        "features_hash": "x" * 64,
    }
    raw.update(overrides)
    return raw


def test_metadata_round_trip_and_schema(tmp_path: Path) -> None:
    cal = {"method": "platt", "a": 0.41, "b": -0.37, "validation": {"samples": 600}}
    meta = ModelMetadata.from_dict(_meta(calibration=cal))
    meta.write(tmp_path)
    again = ModelMetadata.read(tmp_path)
    assert again.calibration == cal and again == meta
    assert ModelMetadata.from_dict(_meta()).calibration == {}  # older metadata: identity
    for bad, words in (
        ({"method": "isotonic", "a": 1.0, "b": 0.0}, "not 'platt'"),
        ({"method": "platt", "a": 0.0, "b": 0.0}, "a must be > 0"),
        ({"method": "platt", "a": -1.0, "b": 0.0}, "a must be > 0"),
        ({"method": "platt", "a": "1", "b": 0.0}, "calibration.a must be a number"),
        ({"method": "platt", "a": 1.0}, "calibration.b must be a number"),
        ({"method": "platt", "a": 1.0, "b": float("inf")}, "finite"),
        ([1, 2], "calibration must be a JSON object"),
    ):
        with pytest.raises(MetadataError, match=words):
            ModelMetadata.from_dict(_meta(calibration=bad))


def test_identity_without_calibration() -> None:
    p = np.array([0.0, 1e-9, 0.3, 0.5, 0.999, 1.0])
    assert np.array_equal(C.apply({}, p), p)
