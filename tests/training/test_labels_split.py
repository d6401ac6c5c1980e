"""Labels look forward on the time grid only; splits keep a gap of horizon + lookback bars."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.features import LOOKBACK_PERIODS
from training.labels import binary_labels, forward_log_return, label_from_return
from training.split import date_ms, min_gap_bars, time_split, walk_forward

H = 3_600_000


def test_a_gap_means_no_label() -> None:
    times = H * np.array([0, 1, 2, 4, 5, 6], dtype=np.int64)  # bar 3 is missing (a halt)
    close = np.array([100.0, 101, 102, 104, 105, 106])
    ret = forward_log_return(times, close, 1, H)
    assert np.isnan(ret[2]) and np.isnan(ret[-1])  # 02:00 -> 03:00 missing; end of data
    assert ret[0] == pytest.approx(math.log(101 / 100))
    ret2 = forward_log_return(times, close, 2, H)
    assert np.isnan(ret2[1]) and ret2[2] == pytest.approx(math.log(104 / 102))


def test_fee_and_threshold() -> None:
    times = H * np.arange(4, dtype=np.int64)
    close = np.array([100.0, 100.05, 100.5, 100.5])
    y = binary_labels(times, close, horizon=1, step_ms=H, fee=0.001)
    assert y[0] == 0.0  # +0.05 % does not cover a 0.1 % fee
    assert y[1] == 1.0  # +0.45 % does
    assert y[2] == 0.0 and np.isnan(y[3])
    assert binary_labels(times, close, horizon=1, step_ms=H, threshold=0.01)[1] == 0.0
    with pytest.raises(ValueError):
        binary_labels(times, close, horizon=0, step_ms=H)


def test_one_rule_for_candles_and_returns() -> None:
    times = H * np.arange(5, dtype=np.int64)
    close = np.array([100.0, 100.05, 100.5, 99.0, 99.0])
    from_candles = binary_labels(times, close, horizon=1, step_ms=H, fee=0.001)
    returns = forward_log_return(times, close, 1, H)
    from_returns = label_from_return(returns, fee=0.001)
    np.testing.assert_array_equal(from_candles, from_returns)  # NaN at the end included
    assert label_from_return(-0.02, fee=0.001) == 0.0  # a profitable short is a down move
    with pytest.raises(ValueError):
        label_from_return(0.01, fee=1.0)


def test_split_keeps_the_gap() -> None:
    times = date_ms("2024-01-01") + H * np.arange(24 * 120, dtype=np.int64)
    usable = np.ones(len(times), dtype=bool)
    horizon = 4
    gap = min_gap_bars(horizon, LOOKBACK_PERIODS)
    split = time_split(
        times,
        usable,
        train_start="2024-01-01",
        train_end="2024-02-29",
        step_ms=H,
        gap_bars=gap,
    )
    tr, va, te = (times[i] for i in (split.train, split.validation, split.test))
    assert tr.min() == date_ms("2024-01-01") and tr.max() == date_ms("2024-03-01") - H
    assert (va.min() - tr.max()) // H >= horizon + LOOKBACK_PERIODS
    assert (te.min() - va.max()) // H >= horizon + LOOKBACK_PERIODS
    assert len(va) > 0 and len(te) > 0 and te.max() == times.max()
    assert abs(len(va) - len(te)) <= 2


def test_walk_forward_moves_forward() -> None:
    times = H * np.arange(5_000, dtype=np.int64)
    folds = walk_forward(times, np.ones(5_000, bool), folds=3, step_ms=H, gap_bars=110)
    assert len(folds) == 3
    for k, f in enumerate(folds):
        assert times[f.train].max() + 110 * H <= times[f.validation].min()
        assert times[f.validation].max() + 110 * H <= times[f.test].min()
        if k:
            assert len(f.train) > len(folds[k - 1].train)
