"""Trading arithmetic of a replay, pure (numpy only) so a test can check it by hand.

Every decision is a trade taken at the close of its bar and closed ``horizon`` bars later at that
bar's close, net of the round-trip ``fee``: exactly what the label of the bar means
(:func:`training.labels.net_log_return`, the one netting rule). BUY is long, SELL short, HOLD no
trade. A strategy of horizon ``h`` splits its equity into ``h`` sleeves, so it holds at most
``h`` overlapping trades of ``1/h`` each; a trade's profit is booked on the bar it closes.
Bar returns compound into the equity curve. Buy-and-hold buys at the first decision's close and
sells at the last exit, paying the fee once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.labels import net_log_return

LONG, FLAT, SHORT = 1, 0, -1


def side_of(signal: str) -> int:
    """BUY -> long, SELL -> short, anything else (HOLD) -> flat."""
    return {"BUY": LONG, "SELL": SHORT}.get(signal, FLAT)


def trade_return(entry: float, exit_: float, side: int, fee: float) -> float:
    """Simple return of one round trip (``side`` 1 long, -1 short) net of ``fee``; 0 when flat."""
    if side == FLAT:
        return 0.0
    log_move = math.log(exit_ / entry)
    return math.expm1(float(net_log_return(log_move, fee=fee, side=side)))


@dataclass(frozen=True)
class Metrics:
    """What one strategy earned over the replay."""

    net_return: float
    sharpe: float
    max_drawdown: float
    hit_rate: float
    trades: int
    turnover: float
    """Notional traded (in and out) over the replay, in multiples of the starting equity."""

    def as_dict(self) -> dict[str, float | int]:
        return {
            "net_return": self.net_return,
            "sharpe": self.sharpe,
            "max_drawdown": self.max_drawdown,
            "hit_rate": self.hit_rate,
            "trades": self.trades,
            "turnover": self.turnover,
        }


def bar_returns(
    close: np.ndarray, bars: Sequence[int], sides: Sequence[int], horizon: int, fee: float
) -> tuple[np.ndarray, list[float]]:
    """Per-bar strategy returns over ``bars[0] .. bars[-1] + horizon`` (index 0 is the first
    decision bar, which earns nothing) and the net return of each trade taken.

    ``close`` is the whole series; ``bars[i]`` is the index of decision ``i``'s bar and
    ``sides[i]`` its side. Decisions whose exit lies beyond the series are not allowed."""
    if not bars:
        return np.zeros(1), []
    start = bars[0]
    length = bars[-1] + horizon - start + 1
    if bars[-1] + horizon >= len(close):
        raise ValueError("a decision's exit lies beyond the candles")
    returns = np.zeros(length)
    trades: list[float] = []
    for bar, side in zip(bars, sides, strict=True):
        if side == FLAT:
            continue
        r = trade_return(float(close[bar]), float(close[bar + horizon]), side, fee)
        trades.append(r)
        returns[bar + horizon - start] += r / horizon
    return returns, trades


def buy_and_hold(close: np.ndarray, first: int, last: int, fee: float) -> np.ndarray:
    """Per-bar returns of holding from ``close[first]`` to ``close[last]``, the round-trip fee
    taken on the first bar (index 0, the entry, earns nothing else)."""
    prices = np.asarray(close[first : last + 1], dtype=np.float64)
    returns = np.zeros(len(prices))
    returns[1:] = prices[1:] / prices[:-1] - 1.0
    returns[0] = -fee
    return returns


def equity(returns: np.ndarray) -> np.ndarray:
    """Compounded equity (starting at 1 before the first bar)."""
    return np.cumprod(1.0 + np.asarray(returns, dtype=np.float64))


def metrics(
    returns: np.ndarray, trades: Sequence[float], horizon: int, bars_per_year: float
) -> Metrics:
    """Net return, annualised Sharpe (mean / std of bar returns x sqrt(bars per year); 0 when
    the returns do not vary), max drawdown (a positive fraction), hit rate (share of trades with
    a positive net return; 0 without trades), trades and turnover."""
    curve = equity(returns)
    peak = np.maximum.accumulate(np.concatenate([[1.0], curve]))[1:]
    drawdown = float(np.max(1.0 - curve / peak)) if len(curve) else 0.0
    std = float(np.std(returns))
    sharpe = float(np.mean(returns)) / std * math.sqrt(bars_per_year) if std > 0 else 0.0
    wins = sum(1 for r in trades if r > 0)
    return Metrics(
        net_return=float(curve[-1] - 1.0) if len(curve) else 0.0,
        sharpe=sharpe,
        max_drawdown=drawdown,
        hit_rate=wins / len(trades) if trades else 0.0,
        trades=len(trades),
        turnover=2.0 * len(trades) / horizon,
    )
