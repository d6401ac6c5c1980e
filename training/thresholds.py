"""Signal thresholds with a stated meaning, chosen per model on its validation data.

What the numbers mean. A model's probability ``p`` is P(up over its horizon, net of the
round-trip fee) -- the label of :func:`training.labels.label_from_return`. A BUY opens a long
for the horizon, a SELL a short; each pays the round-trip fee; HOLD does nothing and earns 0.
The served signal is ``p >= buy`` BUY, ``p <= sell`` SELL, else HOLD
(:func:`xylen_server.signals.signal_for`; :func:`signal_masks` here is its vector form).

The rule (:data:`RULE`), applied to the validation period only, never to the test period:

1. For the BUY side the candidate thresholds are the validation probabilities that put a share
   ``s`` of the validation bars at or above them, for ``s`` from ``min_share`` to ``max_share``
   in steps of :data:`SHARE_STEP`. For each, the mean net log return of a long on those bars
   (:func:`training.labels.net_log_return`, fee included).
2. The BUY threshold is the candidate whose longs earned the most. If that mean is above 0,
   acting beats holding on validation (``buy_edge: true``). If no candidate beats holding, the
   threshold is the one of ``min_share`` -- the least trading the rule allows -- and
   ``buy_edge`` is false: the signal then ranks bars (the model's most bullish ``min_share``),
   it does not promise a profit, and training says so.
3. SELL is the mirror image: the lowest probabilities, a short's net return.

Why a share floor and ceiling: on hourly bars ``P(up net of a 0.1 % fee)`` sits near 0.37, so
fixed 0.55 / 0.45 thresholds answered SELL on 97 % of bars and BUY on none. Choosing on
quantiles of the model's own validation probabilities makes both sides appear (at least
``min_share`` each on validation) and keeps HOLD at least ``1 - 2 * max_share``.

The chosen thresholds, the rule and the validation figures behind them are written to the
model's ``metadata.json`` (``signal_thresholds``); the server serves them (``BUY_THRESHOLD`` /
``SELL_THRESHOLD`` override them), and training prints the test period's signal mix, hit rates
and mean net returns against the base rates (:func:`signal_report`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from training.labels import net_log_return

#: Name and version of the rule above, stored with the thresholds.
RULE = "best-validation-net-return/v1"
#: Fewest / most validation bars each side may act on (see the module docstring).
MIN_SHARE = 0.15
MAX_SHARE = 0.40
#: Step between candidate shares.
SHARE_STEP = 0.025
#: Fewest validation rows the rule accepts.
MIN_VALIDATION_ROWS = 50


class ThresholdError(ValueError):
    """The validation data cannot support the rule (too few rows, bad shares)."""


def signal_masks(
    proba: np.ndarray, buy: float, sell: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BUY, SELL and HOLD masks of probabilities: ``p >= buy``, ``p <= sell`` (not BUY), rest."""
    p = np.asarray(proba, dtype=np.float64)
    is_buy = p >= buy
    is_sell = ~is_buy & (p <= sell)
    return is_buy, is_sell, ~(is_buy | is_sell)


def _shares(min_share: float, max_share: float) -> np.ndarray:
    if not 0.0 < min_share <= max_share <= 0.5:
        raise ThresholdError(
            f"need 0 < min_share <= max_share <= 0.5, got {min_share} and {max_share}"
        )
    count = math.floor((max_share - min_share) / SHARE_STEP + 1e-9) + 1
    return np.round(min_share + SHARE_STEP * np.arange(count), 9)


def _side(
    proba: np.ndarray, net: np.ndarray, shares: np.ndarray, top: bool
) -> tuple[float, float, float, bool]:
    """(threshold, share on validation, mean net return, edge) of one side."""
    ranked_p = np.sort(proba)[::-1] if top else np.sort(proba)
    n = len(proba)
    best: tuple[float, float, float] | None = None
    floor: tuple[float, float, float] | None = None
    for share in shares:
        k = max(1, math.ceil(share * n - 1e-9))
        threshold = float(ranked_p[k - 1])
        acted = proba >= threshold if top else proba <= threshold  # ties act together
        mean = float(net[acted].mean())
        candidate = (threshold, float(acted.mean()), mean)
        if floor is None:
            floor = candidate
        if best is None or mean > best[2]:
            best = candidate
    assert best is not None and floor is not None
    if best[2] > 0:
        return (*best, True)
    return (*floor, False)


def choose_thresholds(
    proba: np.ndarray,
    log_return: np.ndarray,
    *,
    fee: float,
    min_share: float = MIN_SHARE,
    max_share: float = MAX_SHARE,
) -> dict[str, Any]:
    """The BUY and SELL thresholds of :data:`RULE` from validation probabilities and the
    underlying's forward log returns over the model's horizon (rows with an unknown return are
    ignored). Returns the metadata's ``signal_thresholds`` mapping."""
    p = np.asarray(proba, dtype=np.float64)
    r = np.asarray(log_return, dtype=np.float64)
    known = np.isfinite(p) & np.isfinite(r)
    p, r = p[known], r[known]
    if len(p) < MIN_VALIDATION_ROWS:
        raise ThresholdError(
            f"{len(p)} validation rows cannot choose signal thresholds "
            f"(need at least {MIN_VALIDATION_ROWS})"
        )
    shares = _shares(min_share, max_share)
    buy, buy_share, buy_mean, buy_edge = _side(p, net_log_return(r, fee=fee), shares, top=True)
    sell, sell_share, sell_mean, sell_edge = _side(
        p, net_log_return(r, fee=fee, side=-1), shares, top=False
    )
    if not sell < buy:
        raise ThresholdError(
            f"the validation probabilities are too few distinct values to separate BUY from "
            f"SELL (buy {buy:.6g}, sell {sell:.6g})"
        )
    return {
        "buy": buy,
        "sell": sell,
        "rule": RULE,
        "min_share": float(min_share),
        "max_share": float(max_share),
        "validation": {
            "samples": len(p),
            "buy_share": buy_share,
            "sell_share": sell_share,
            "buy_mean_net_return": buy_mean,
            "sell_mean_net_return": sell_mean,
            "buy_edge": buy_edge,
            "sell_edge": sell_edge,
        },
    }


def _side_report(acted: np.ndarray, net: np.ndarray, threshold: float) -> dict[str, Any]:
    hits = net > threshold
    count = int(acted.sum())
    return {
        "count": count,
        "hit_rate": float(hits[acted].mean()) if count else None,
        "mean_net_return": float(net[acted].mean()) if count else None,
        "base_hit_rate": float(hits.mean()),
        "base_mean_net_return": float(net.mean()),
    }


def signal_report(
    proba: np.ndarray,
    log_return: np.ndarray,
    *,
    buy: float,
    sell: float,
    fee: float,
    label_threshold: float = 0.0,
) -> dict[str, Any]:
    """What the signal did on a period: the BUY / SELL / HOLD shares, and for BUY (a long) and
    SELL (a short) the hit rate (net return above ``label_threshold``, fee included) and the
    mean net log return, each beside its base rate over every bar of the period (what acting
    on every bar would have done). Rows with an unknown return are left out."""
    p = np.asarray(proba, dtype=np.float64)
    r = np.asarray(log_return, dtype=np.float64)
    known = np.isfinite(p) & np.isfinite(r)
    p, r = p[known], r[known]
    if not len(p):
        return {"samples": 0}
    is_buy, is_sell, is_hold = signal_masks(p, buy, sell)
    return {
        "samples": len(p),
        "share": {
            "BUY": float(is_buy.mean()),
            "SELL": float(is_sell.mean()),
            "HOLD": float(is_hold.mean()),
        },
        "buy": _side_report(is_buy, net_log_return(r, fee=fee), label_threshold),
        "sell": _side_report(is_sell, net_log_return(r, fee=fee, side=-1), label_threshold),
    }
