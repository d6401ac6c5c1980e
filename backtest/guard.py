"""Look-ahead guards: a decision may see its own bar and the ones before, nothing after.

:func:`check_window` runs on every decision of a replay, before its window is sent: the window
must be the ``lookback`` candles ending exactly at the decision bar. :func:`check_causal_features`
recomputes the features of some bars from the series cut at that bar and compares them with the
features computed on the whole series: a feature that reads a later bar differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np


class LookAheadError(AssertionError):
    """A decision saw a candle after its bar."""


def check_window(window_open_times: np.ndarray, decision_open_time: int, lookback: int) -> None:
    """The window ends at the decision bar, is ``lookback`` long and in time order."""
    times = np.asarray(window_open_times, dtype=np.int64)
    if len(times) != lookback:
        raise LookAheadError(f"window has {len(times)} candles, lookback is {lookback}")
    if int(times.max()) > decision_open_time:
        raise LookAheadError(
            f"window reaches {int(times.max())}, after the decision bar {decision_open_time}"
        )
    if int(times[-1]) != decision_open_time or not bool(np.all(np.diff(times) > 0)):
        raise LookAheadError("window does not end at the decision bar in time order")


def check_causal_features(
    candles: Mapping[str, np.ndarray],
    bars: Iterable[int],
    compute: Callable[[Mapping[str, np.ndarray]], np.ndarray] | None = None,
) -> None:
    """Each of ``bars``' feature rows is the same whether computed on the whole series or on the
    series cut at that bar. ``compute`` maps candles to a feature matrix (default: training's
    :func:`~training.features.compute_features`, the code the servers run on a window)."""
    if compute is None:
        from training.features import compute_features

        compute = compute_features
    full = np.asarray(compute(candles), dtype=np.float64)
    for bar in bars:
        cut = {k: np.asarray(v)[: bar + 1] for k, v in candles.items()}
        a = full[bar]
        b = np.asarray(compute(cut), dtype=np.float64)[bar]
        same = np.isclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True)
        if not bool(np.all(same)):
            bad = int(np.argmin(same))
            raise LookAheadError(
                f"bar {bar}: feature {bad} changes when the candles after it are removed "
                f"({a[bad]!r} with them, {b[bad]!r} without)"
            )
