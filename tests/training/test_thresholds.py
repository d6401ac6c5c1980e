"""The signal-threshold rule (training/thresholds.py) checked by hand, and the served rule
(xylen_server/signals.py) it must agree with."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.labels import net_log_return
from training.thresholds import (
    MAX_SHARE,
    MIN_SHARE,
    MIN_VALIDATION_ROWS,
    RULE,
    SHARE_STEP,
    ThresholdError,
    choose_thresholds,
    signal_masks,
    signal_report,
)
from xylen_server.signals import (
    DEFAULT_BUY_THRESHOLD,
    DEFAULT_SELL_THRESHOLD,
    Signal,
    ThresholdSource,
    resolve_thresholds,
    signal_for,
)

FEE = 0.001


def _brute_force(p: np.ndarray, net: np.ndarray, shares: list[float], top: bool) -> tuple:
    """The rule spelled out: the candidate share with the best mean, else the smallest."""
    ranked = np.sort(p)[::-1] if top else np.sort(p)
    candidates = []
    for share in shares:
        t = ranked[math.ceil(round(share * len(p), 6)) - 1]
        acted = p >= t if top else p <= t
        candidates.append((float(t), float(net[acted].mean())))
    best = max(candidates, key=lambda c: c[1])
    return best if best[1] > 0 else candidates[0]


def test_buy_side_takes_the_share_with_the_best_net_return() -> None:
    rng = np.random.default_rng(3)
    n = 2000
    p = rng.uniform(0.2, 0.6, n)
    # The most bullish tenth is wrong (-0.2 %), the next 15 % right (+1 %), the rest -0.2 %:
    # the mean over the top share peaks at exactly 25 %.
    order = np.argsort(-p)
    r = np.full(n, -0.002)
    r[order[n // 10 : n // 4]] = 0.01
    chosen = choose_thresholds(p, r, fee=FEE, min_share=0.1, max_share=0.4)
    shares = [0.1 + SHARE_STEP * k for k in range(13)]
    buy, buy_mean = _brute_force(p, net_log_return(r, fee=FEE), shares, top=True)
    assert chosen["buy"] == buy
    assert chosen["validation"]["buy_mean_net_return"] == pytest.approx(buy_mean)
    assert chosen["validation"]["buy_edge"] is True
    assert chosen["validation"]["buy_share"] == pytest.approx(0.25, abs=1 / n)
    assert chosen["rule"] == RULE


def test_no_edge_acts_on_the_minimum_share_only() -> None:
    rng = np.random.default_rng(4)
    n = 1000
    p = rng.uniform(0.3, 0.45, n)
    r = rng.normal(0.0, 1e-4, n)  # moves far below the fee: no trade beats holding
    chosen = choose_thresholds(p, r, fee=FEE, min_share=0.125, max_share=0.4)
    v = chosen["validation"]
    assert (v["buy_edge"], v["sell_edge"]) == (False, False)
    assert v["buy_share"] == pytest.approx(0.125, abs=1 / n)
    assert v["sell_share"] == pytest.approx(0.125, abs=1 / n)
    assert v["buy_mean_net_return"] < 0 and v["sell_mean_net_return"] < 0


def test_probabilities_far_below_one_half_still_give_both_signals() -> None:
    """The bug the rule fixes: P(up net of fee) near 0.37 read as SELL on 97 % of bars."""
    rng = np.random.default_rng(5)
    p = np.clip(rng.normal(0.37, 0.04, 3000), 0, 1)
    r = rng.normal(0, 0.006, 3000)
    old = signal_masks(p, DEFAULT_BUY_THRESHOLD, DEFAULT_SELL_THRESHOLD)
    assert old[1].mean() > 0.95 and old[0].mean() < 0.01
    chosen = choose_thresholds(p, r, fee=FEE)
    is_buy, is_sell, is_hold = signal_masks(p, chosen["buy"], chosen["sell"])
    assert MIN_SHARE <= is_buy.mean() <= MAX_SHARE + SHARE_STEP
    assert MIN_SHARE <= is_sell.mean() <= MAX_SHARE + SHARE_STEP
    assert is_hold.mean() >= 1 - 2 * (MAX_SHARE + SHARE_STEP)
    assert chosen["sell"] < chosen["buy"]


def test_sell_side_is_the_mirror_on_short_returns() -> None:
    rng = np.random.default_rng(6)
    n = 1500
    p = rng.uniform(0.2, 0.6, n)
    r = np.full(n, 0.002)
    low = np.argsort(p)
    r[low[int(n * 0.15) : int(n * 0.3)]] = -0.01  # shorts earn only from the 15th to 30th %
    chosen = choose_thresholds(p, r, fee=FEE)
    shares = [MIN_SHARE + SHARE_STEP * k for k in range(11)]
    sell, mean = _brute_force(p, net_log_return(r, fee=FEE, side=-1), shares, top=False)
    assert chosen["sell"] == sell
    assert chosen["validation"]["sell_edge"] is True
    assert chosen["validation"]["sell_mean_net_return"] == pytest.approx(mean)
    assert chosen["validation"]["sell_share"] == pytest.approx(0.3, abs=1 / n)


def test_unknown_returns_are_ignored_and_too_few_rows_refused() -> None:
    p = np.linspace(0.1, 0.9, MIN_VALIDATION_ROWS + 10)
    r = np.full(len(p), np.nan)
    with pytest.raises(ThresholdError, match="validation rows"):
        choose_thresholds(p, r, fee=FEE)
    with pytest.raises(ThresholdError, match="min_share"):
        choose_thresholds(p, np.zeros(len(p)), fee=FEE, min_share=0.3, max_share=0.2)
    with pytest.raises(ThresholdError, match="distinct"):
        choose_thresholds(np.full(100, 0.4), np.zeros(100), fee=FEE)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.3, 0.30000001, 0.45, 0.5, 0.6, 0.6000001, 1.0])
def test_masks_are_the_served_rule(p: float) -> None:
    buy, sell = 0.6, 0.3
    is_buy, is_sell, is_hold = signal_masks(np.array([p]), buy, sell)
    served = signal_for(p, buy, sell)
    assert (bool(is_buy[0]), bool(is_sell[0]), bool(is_hold[0])) == (
        served is Signal.BUY,
        served is Signal.SELL,
        served is Signal.HOLD,
    )


def test_signal_report_by_hand() -> None:
    p = np.array([0.9, 0.8, 0.5, 0.2, 0.1, np.nan])
    r = np.array([0.01, -0.01, 0.0, -0.02, 0.0005, 0.03])
    report = signal_report(p, r, buy=0.8, sell=0.2, fee=FEE)
    c = math.log1p(-FEE)
    assert report["samples"] == 5
    assert report["share"] == {"BUY": 0.4, "SELL": 0.4, "HOLD": 0.2}
    long_net = np.array([0.01, -0.01, 0.0, -0.02, 0.0005]) + c
    short_net = -np.array([0.01, -0.01, 0.0, -0.02, 0.0005]) + c
    buy = report["buy"]
    assert buy["count"] == 2
    assert buy["hit_rate"] == 0.5  # +1 % is a hit, -1 % is not
    assert buy["mean_net_return"] == pytest.approx(long_net[:2].mean())
    assert buy["base_hit_rate"] == pytest.approx(1 / 5)
    assert buy["base_mean_net_return"] == pytest.approx(long_net.mean())
    sell = report["sell"]
    assert sell["count"] == 2
    assert sell["hit_rate"] == 0.5  # -2 % is a short's hit, +0.05 % is not (the fee)
    assert sell["mean_net_return"] == pytest.approx(short_net[3:].mean())
    assert sell["base_hit_rate"] == pytest.approx(2 / 5)


def test_served_thresholds_resolve_model_environment_default() -> None:
    model = {"buy": 0.41, "sell": 0.33, "rule": RULE}
    own = resolve_thresholds(model)
    assert (own.buy, own.sell, own.source, own.rule) == (0.41, 0.33, ThresholdSource.MODEL, RULE)
    old = resolve_thresholds({})
    assert (old.buy, old.sell, old.source) == (0.55, 0.45, ThresholdSource.DEFAULT)
    partial = resolve_thresholds(model, buy_override=0.5)
    assert (partial.buy, partial.sell, partial.source) == (
        0.5,
        0.33,
        ThresholdSource.ENVIRONMENT,
    )
    with pytest.raises(ValueError, match=r"SELL threshold 0\.45 is not below BUY threshold 0\.41"):
        resolve_thresholds(model, sell_override=0.45)
