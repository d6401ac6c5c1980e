"""Labels: the only forward-looking code in xylen.

The label of the bar that opens at ``t`` compares its close with the close of the bar that opens
at ``t + horizon * interval`` on the time grid -- not ``horizon`` rows later: where that bar is
missing (a halt, a gap, the end of the data) the future is unknown and the label is NaN.
"""

from __future__ import annotations

import math

import numpy as np


def forward_log_return(
    open_time: np.ndarray, close: np.ndarray, horizon: int, step_ms: int
) -> np.ndarray:
    """``log(close[t + horizon * step] / close[t])`` per bar; NaN where that bar does not exist.

    ``open_time`` (epoch ms) must be strictly increasing.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1 bar, got {horizon}")
    open_time = np.asarray(open_time, dtype=np.int64)
    close = np.asarray(close, dtype=np.float64)
    target = open_time + horizon * step_ms
    idx = np.searchsorted(open_time, target)
    safe = np.minimum(idx, len(open_time) - 1)
    found = (idx < len(open_time)) & (open_time[safe] == target) & (close > 0) & (close[safe] > 0)
    out = np.full(len(open_time), np.nan)
    out[found] = np.log(close[safe[found]] / close[found])
    return out


def net_log_return(
    log_return: np.ndarray | float, *, fee: float = 0.0, side: int = 1
) -> np.ndarray:
    """The log return of a round trip net of the ``fee`` (a fraction of the notional, netted as
    ``log(1 - fee)``): ``side=1`` a long over the move ``log_return``, ``side=-1`` a short over
    it (the move's opposite). NaN where the move is unknown. The netting the label uses."""
    if not 0.0 <= fee < 1.0:
        raise ValueError(f"fee must be a fraction in [0, 1), got {fee}")
    if side not in (1, -1):
        raise ValueError(f"side must be 1 (long) or -1 (short), got {side}")
    return side * np.asarray(log_return, dtype=np.float64) + math.log1p(-fee)


def label_from_return(
    log_return: np.ndarray | float, *, fee: float = 0.0, threshold: float = 0.0
) -> np.ndarray:
    """The label of a bar from the underlying's forward log return over the model's horizon.

    1.0 where the return net of a round-trip ``fee`` exceeds ``threshold``, else 0.0; NaN where the
    return is unknown. This is the one label rule: training applies it to candles
    (:func:`binary_labels`) and the feedback loop to the return a trade's outcome reports, so a
    retrain learns from labels of the same definition the model was trained on. The label is about
    the underlying's move, not the trade's profit: a profitable short is a down move (label 0).
    """
    net = net_log_return(log_return, fee=fee)
    labels = np.where(net > threshold, 1.0, 0.0)
    labels[np.isnan(net)] = np.nan
    return labels


def binary_labels(
    open_time: np.ndarray,
    close: np.ndarray,
    *,
    horizon: int,
    step_ms: int,
    fee: float = 0.0,
    threshold: float = 0.0,
) -> np.ndarray:
    """1.0 where the forward log return net of a round-trip ``fee`` exceeds ``threshold``, else 0.0.

    The fee is a fraction of the notional (0.001 = 0.1 %), netted as ``log(1 - fee)``. Bars whose
    future is unknown get NaN.
    """
    return label_from_return(
        forward_log_return(open_time, close, horizon, step_ms), fee=fee, threshold=threshold
    )
