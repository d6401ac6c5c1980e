"""The shared feature code: interface, finite window, online == offline on real data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from training import features as F
from training.generator import simulate
from training.klines import load_klines

L = F.LOOKBACK_PERIODS


def _synthetic(n: int = 600, seed: int = 3) -> dict[str, np.ndarray]:
    times = 1_700_000_000_000 + 3_600_000 * np.arange(n, dtype=np.int64)
    return F.candles_from_frame(simulate(times, 3_600_000, seed))


def _windows_match(candles: dict[str, np.ndarray]) -> float:
    """Largest |online - offline| over every row with a full window."""
    offline = F.compute_features(candles)
    worst = 0.0
    for i in range(L - 1, len(offline)):
        online = F.window_features({k: v[i - L + 1 : i + 1] for k, v in candles.items()})
        worst = max(worst, float(np.max(np.abs(online - offline[i]))))
    return worst


def test_interface_shapes_and_names() -> None:
    assert len(F.FEATURE_NAMES) == len(set(F.FEATURE_NAMES))
    assert tuple(n for s in F.FEATURES for n in s.outputs) == F.FEATURE_NAMES
    assert F.CANDLE_FIELDS[0] == "open_time"
    x = F.compute_features(_synthetic())
    assert x.shape == (600, len(F.FEATURE_NAMES)) and x.dtype == np.float64
    assert np.isnan(x[: L - 1]).all()
    assert np.isfinite(x[L - 1 :]).all()


def test_hash_is_stable_and_tracks_the_definitions(monkeypatch: pytest.MonkeyPatch) -> None:
    first = F.feature_definitions_hash()
    assert first == F.feature_definitions_hash() and len(first) == 64
    monkeypatch.setattr(F, "FEATURES_VERSION", F.FEATURES_VERSION + 1)
    assert F.feature_definitions_hash() != first
    monkeypatch.undo()
    monkeypatch.setattr(F, "LOOKBACK_PERIODS", L + 1)
    assert F.feature_definitions_hash() != first


def test_row_depends_only_on_its_window() -> None:
    candles = _synthetic()
    base = F.compute_features(candles)
    i = 400
    before = {k: v.copy() for k, v in candles.items()}
    for name in ("open", "high", "low", "close", "volume", "taker_buy_base_volume"):
        before[name][i - L] *= 3.0  # the candle just outside the window
    assert np.array_equal(F.compute_features(before)[i], base[i])
    inside = {k: v.copy() for k, v in candles.items()}
    inside["close"][i - L + 1 : i - L + 11] *= 1.5  # the oldest candles inside the window
    assert not np.array_equal(F.compute_features(inside)[i], base[i])


def test_chunked_offline_equals_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    candles = _synthetic(900)
    whole = F.compute_features(candles)
    monkeypatch.setattr(F, "_CHUNK_ROWS", 97)
    assert np.array_equal(F.compute_features(candles), whole, equal_nan=True)


def test_zero_volume_and_flat_bars_are_finite_with_documented_values() -> None:
    candles = _synthetic(300)
    for k in ("volume", "quote_volume", "taker_buy_base_volume", "trades"):
        candles[k][150:] = 0.0
    for k in ("open", "high", "low"):
        candles[k][150:] = candles["close"][150]
    candles["close"][150:] = candles["close"][150]
    row = dict(zip(F.FEATURE_NAMES, F.compute_features(candles)[-1], strict=True))
    assert all(np.isfinite(v) for v in row.values())
    assert row["taker_buy_ratio_1"] == F.ZERO_DIVISION_DEFAULTS["taker_buy_ratio"]
    assert row["rsi_14"] == F.ZERO_DIVISION_DEFAULTS["rsi"]
    assert row["bb_percent_b"] == F.ZERO_DIVISION_DEFAULTS["bb_percent_b"]
    assert row["body_ratio"] == row["upper_wick_ratio"] == row["volume_zscore_50"] == 0.0
    assert row["vwap_distance_20"] == 0.0


def test_time_features() -> None:
    # 2024-01-01 was a Monday; the bar opening 13:30 UTC is 0.5625 of the way through the day.
    t0 = 1_704_115_800_000
    candles = _synthetic(L)
    candles["open_time"] = t0 - 60_000 * np.arange(L - 1, -1, -1, dtype=np.int64)
    row = dict(zip(F.FEATURE_NAMES, F.window_features(candles), strict=True))
    assert row["time_of_day"] == 0.5625 and row["day_of_week"] == 0.0


def test_window_needs_the_lookback() -> None:
    candles = {k: v[: L - 1] for k, v in _synthetic(L).items()}
    with pytest.raises(ValueError, match=str(L)):
        F.window_features(candles)


@pytest.mark.realdata
@pytest.mark.parametrize(
    "relative",
    [
        "jamado95__whatever/BTCUSDT-1h-2023-01.csv",  # the 2023-03-24 halt and its zero-volume bar
        "jamado95__whatever/BTCUSDC-5m-2018-12.csv",  # 196 zero-volume bars
    ],
)
def test_online_equals_offline_on_every_row_of_a_real_file(
    relative: str, real_file: Callable[[str], Path]
) -> None:
    klines = load_klines(real_file(relative), policy="keep")
    candles = F.candles_from_frame(klines.frame)
    assert np.isfinite(F.compute_features(candles)[L - 1 :]).all()
    assert _windows_match(candles) <= 1e-9


def test_candles_from_frame_types() -> None:
    frame = simulate(np.array([0, 60_000], dtype=np.int64), 60_000, 1)
    arrays = F.candles_from_frame(frame)
    assert set(arrays) == set(F.CANDLE_FIELDS)
    assert arrays["open_time"].dtype == np.int64 and arrays["trades"].dtype == np.float64
    assert isinstance(frame, pl.DataFrame)
