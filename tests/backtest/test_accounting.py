"""The replay's trading arithmetic, checked by hand (pure functions, no stack)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backtest.accounting import (
    bar_returns,
    buy_and_hold,
    equity,
    metrics,
    side_of,
    trade_return,
)

FEE = 0.001


def test_a_trade_is_the_labels_round_trip_net_of_the_fee() -> None:
    # long 100 -> 110: (110 / 100) * (1 - fee) - 1
    assert trade_return(100.0, 110.0, 1, FEE) == pytest.approx(1.1 * 0.999 - 1, rel=1e-12)
    # short 100 -> 90: (100 / 90) * (1 - fee) - 1 (a short earns the log move's opposite)
    assert trade_return(100.0, 90.0, -1, FEE) == pytest.approx(100 / 90 * 0.999 - 1, rel=1e-12)
    # a short that loses
    assert trade_return(100.0, 105.0, -1, FEE) < -0.04
    assert trade_return(100.0, 50.0, 0, FEE) == 0.0  # flat: no trade, no fee
    assert [side_of(s) for s in ("BUY", "SELL", "HOLD", "")] == [1, -1, 0, 0]


def test_bar_returns_book_each_trade_on_its_exit_bar_in_horizon_sleeves() -> None:
    close = np.array([100.0, 110.0, 99.0, 99.0, 120.0])
    returns, trades = bar_returns(close, [0, 1, 2], [1, -1, 0], 2, FEE)
    long0 = 99.0 / 100.0 * 0.999 - 1  # bar 0 -> bar 2
    short1 = 110.0 / 99.0 * 0.999 - 1  # bar 1 -> bar 3
    assert trades == pytest.approx([long0, short1], rel=1e-12)
    # indices 0..4 relative to bar 0; half the equity per sleeve
    assert returns.tolist() == pytest.approx([0.0, 0.0, long0 / 2, short1 / 2, 0.0], rel=1e-12)
    with pytest.raises(ValueError, match="beyond"):
        bar_returns(close, [3], [1], 2, FEE)


def test_metrics_by_hand() -> None:
    returns = np.array([0.0, 0.10, -0.20, 0.05])
    curve = equity(returns)
    assert curve.tolist() == pytest.approx([1.0, 1.1, 0.88, 0.924])
    m = metrics(returns, [0.10, -0.20, 0.05], 1, bars_per_year=4)
    assert m.net_return == pytest.approx(-0.076)
    assert m.max_drawdown == pytest.approx(0.2)  # 1.1 -> 0.88
    assert m.hit_rate == pytest.approx(2 / 3)
    assert m.trades == 3 and m.turnover == 6.0
    mean, std = returns.mean(), returns.std()
    assert m.sharpe == pytest.approx(mean / std * math.sqrt(4))
    flat = metrics(np.zeros(5), [], 1, 8766)
    assert (flat.sharpe, flat.hit_rate, flat.net_return, flat.max_drawdown) == (0, 0, 0, 0)


def test_buy_and_hold_pays_the_fee_once() -> None:
    close = np.array([50.0, 100.0, 80.0, 120.0, 1.0])
    hold = buy_and_hold(close, 1, 3, FEE)
    assert len(hold) == 3
    assert equity(hold)[-1] == pytest.approx((1 - FEE) * 120.0 / 100.0, rel=1e-12)
