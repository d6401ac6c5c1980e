"""The feature definitions: one implementation, imported by training and by the server.

Every feature of row ``i`` is a function of the candles ``i - LOOKBACK_PERIODS + 1 .. i`` only
(backward-looking, finite window). Indicators that are usually recursive are defined over a finite
window so that a server holding just the last ``LOOKBACK_PERIODS`` candles computes exactly what
training computed over the full history:

* RSI uses simple (not Wilder) averages of gains and losses;
* MACD is a percentage price oscillator built from FIR EMAs: EMA weights truncated to a fixed
  number of taps and renormalised to sum to one, so slow taps + signal taps - 1 <= lookback.

Both paths run the same code (:func:`_compute_rows`): :func:`compute_features` over chunks of a
long series, :func:`window_features` over one window. Features count rows, not time: a window that
spans a trading halt is featurised as the rows it holds (labels, not features, look at the grid).

Ratios never produce NaN or inf: a zero denominator gives the documented neutral value
(:data:`ZERO_DIVISION_DEFAULTS`), for example a taker-buy ratio of 0.5 on a zero-volume bar.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    import polars as pl

FloatArray = np.ndarray

#: Bumped whenever the arithmetic of a feature changes without its name or parameters changing.
FEATURES_VERSION: int = 1

#: Candles one feature row needs; the last one is the bar we predict from.
LOOKBACK_PERIODS: int = 100

#: Candle columns the features read (open_time int64 epoch ms UTC, the others float64).
CANDLE_FIELDS = (
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "trades",
    "taker_buy_base_volume",
)

#: Value of a ratio whose denominator is zero (zero-volume bar, flat window, O=H=L=C bar).
ZERO_DIVISION_DEFAULTS: dict[str, float] = {
    "rsi": 50.0,  # no gains and no losses: neutral
    "bb_percent_b": 0.5,  # flat window: the close sits on the middle band
    "taker_buy_ratio": 0.5,  # no volume: neither side dominates
    "other": 0.0,  # z-scores, body/wick ratios, distances, returns on a zero price
}

_DAY_MS = 86_400_000
#: Relative std below which a window counts as flat (see :func:`_rolling_mean_std`).
_FLAT_STD = 1e-10
#: Chunk of output rows computed at once by :func:`compute_features` (bounds temporaries).
_CHUNK_ROWS = 32_768


@dataclass(frozen=True)
class FeatureSpec:
    """One indicator with its parameters and the model input columns it produces."""

    indicator: str
    params: tuple[tuple[str, int | float], ...]
    outputs: tuple[str, ...]

    @property
    def kwargs(self) -> dict[str, int | float]:
        return dict(self.params)


def _spec(indicator: str, outputs: tuple[str, ...], **params: int | float) -> FeatureSpec:
    return FeatureSpec(indicator, tuple(sorted(params.items())), outputs)


FEATURES: tuple[FeatureSpec, ...] = (
    *(_spec("log_return", (f"log_return_{p}",), periods=p) for p in (1, 3, 6, 12, 24, 48)),
    _spec("rsi", ("rsi_14",), period=14),
    _spec(
        "macd",
        ("macd", "macd_signal", "macd_hist"),
        fast=12,
        slow=26,
        signal=9,
        taps=64,
        signal_taps=32,
    ),
    _spec("bollinger", ("bb_percent_b", "bb_width"), period=20, num_std=2.0),
    _spec("atr", ("atr_pct_14",), period=14),
    _spec("realized_volatility", ("realized_vol_20",), period=20),
    _spec("realized_volatility", ("realized_vol_60",), period=60),
    _spec("volume_zscore", ("volume_zscore_50",), period=50),
    _spec("taker_buy_ratio", ("taker_buy_ratio_1",), period=1),
    _spec("taker_buy_ratio", ("taker_buy_ratio_20",), period=20),
    _spec("vwap_distance", ("vwap_distance_20",), period=20),
    _spec("candle_shape", ("body_ratio", "upper_wick_ratio", "lower_wick_ratio", "range_pct")),
    _spec("time_of_day", ("time_of_day",)),
    _spec("day_of_week", ("day_of_week",)),
)

#: Model input columns, in order.
FEATURE_NAMES: tuple[str, ...] = tuple(name for spec in FEATURES for name in spec.outputs)


def feature_definitions_hash(
    names: tuple[str, ...] | list[str] | None = None, lookback: int | None = None
) -> str:
    """sha256 hex of a canonical description of the feature definitions, and of the selection
    a model uses (its feature ``names`` in order and its ``lookback``; default: all features
    over :data:`LOOKBACK_PERIODS`).

    A model records this at training time; the server refuses a model whose hash differs.
    """
    canonical = {
        "version": FEATURES_VERSION,
        "lookback": LOOKBACK_PERIODS if lookback is None else int(lookback),
        "candle_fields": list(CANDLE_FIELDS),
        "features": [[s.indicator, [list(p) for p in s.params], list(s.outputs)] for s in FEATURES],
        "feature_names": list(FEATURE_NAMES if names is None else names),
        "zero_division_defaults": ZERO_DIVISION_DEFAULTS,
        "flat_std": _FLAT_STD,
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Building blocks. Each works on 1-D arrays of length m (m >= lookback) and returns the values
# for the last ``rows = m - lookback + 1`` positions (lookback >= the spec's history_needed).


def _div(num: FloatArray, den: FloatArray, default: float) -> FloatArray:
    """``num / den`` with ``default`` wherever ``den == 0``."""
    out = np.full(np.broadcast(num, den).shape, default, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _rolling_sum(x: FloatArray, k: int) -> FloatArray:
    """Sum of each window of ``k`` consecutive values; ``len(x) - k + 1`` values."""
    return np.convolve(x, np.ones(k), "valid")


def _fir_ema(x: FloatArray, span: int, taps: int) -> FloatArray:
    """EMA with smoothing ``2 / (span + 1)`` truncated to ``taps`` weights summing to one."""
    alpha = 2.0 / (span + 1.0)
    weights = alpha * (1.0 - alpha) ** np.arange(taps)
    # np.convolve puts weights[0] on the newest value of each window.
    return np.convolve(x, weights / weights.sum(), "valid")


def _log_ratio(a: FloatArray, b: FloatArray) -> FloatArray:
    """``log(a / b)``, 0 where either price is not positive."""
    ok = (a > 0) & (b > 0)
    out = np.zeros(np.broadcast(a, b).shape)
    np.log(np.divide(a, b, out=np.ones_like(out), where=ok), out=out, where=ok)
    return out


class _Ctx:
    """The candle arrays of one computation and shared intermediate series."""

    def __init__(self, c: Mapping[str, np.ndarray], lookback: int = LOOKBACK_PERIODS) -> None:
        self.open = np.asarray(c["open"], dtype=np.float64)
        self.high = np.asarray(c["high"], dtype=np.float64)
        self.low = np.asarray(c["low"], dtype=np.float64)
        self.close = np.asarray(c["close"], dtype=np.float64)
        self.volume = np.asarray(c["volume"], dtype=np.float64)
        self.quote_volume = np.asarray(c["quote_volume"], dtype=np.float64)
        self.taker_buy = np.asarray(c["taker_buy_base_volume"], dtype=np.float64)
        self.open_time = np.asarray(c["open_time"], dtype=np.int64)
        self.m = len(self.close)
        self.rows = self.m - lookback + 1
        self._ret1: FloatArray | None = None

    def last(self, x: FloatArray) -> FloatArray:
        """The values of a series (aligned to the end) at the output rows."""
        return x[len(x) - self.rows :]

    @property
    def ret1(self) -> FloatArray:
        """One-bar log returns, ``m - 1`` values (index j is the return into candle j + 1)."""
        if self._ret1 is None:
            self._ret1 = _log_ratio(self.close[1:], self.close[:-1])
        return self._ret1


def _log_return(ctx: _Ctx, periods: int) -> list[FloatArray]:
    return [ctx.last(_log_ratio(ctx.close[periods:], ctx.close[:-periods]))]


def _rsi(ctx: _Ctx, period: int) -> list[FloatArray]:
    diff = np.diff(ctx.close)
    gains = _rolling_sum(np.maximum(diff, 0.0), period)
    losses = _rolling_sum(np.maximum(-diff, 0.0), period)
    rsi = _div(100.0 * gains, gains + losses, ZERO_DIVISION_DEFAULTS["rsi"])
    return [ctx.last(rsi)]


def _macd(
    ctx: _Ctx, fast: int, slow: int, signal: int, taps: int, signal_taps: int
) -> list[FloatArray]:
    slow_ema = _fir_ema(ctx.close, slow, taps)
    fast_ema = _fir_ema(ctx.close, fast, taps)
    line = _div(fast_ema - slow_ema, slow_ema, ZERO_DIVISION_DEFAULTS["other"])
    sig = _fir_ema(line, signal, signal_taps)
    line = ctx.last(line)
    sig = ctx.last(sig)
    return [line, sig, line - sig]


def _rolling_mean_std(x: FloatArray, k: int, rows: int) -> tuple[FloatArray, FloatArray]:
    """Mean and population std (two-pass, no cancellation) of the last ``rows`` windows."""
    windows = sliding_window_view(x[len(x) - rows - k + 1 :], k)
    mean = windows.mean(axis=1)
    std = np.sqrt(np.square(windows - mean[:, None]).mean(axis=1))
    # A constant window's mean can be off by an ulp, leaving a spurious std of ~1e-13 * mean;
    # call that flat, so ratios over it take their zero-division value instead of noise.
    std[std <= _FLAT_STD * np.abs(mean)] = 0.0
    return mean, std


def _bollinger(ctx: _Ctx, period: int, num_std: float) -> list[FloatArray]:
    mean, std = _rolling_mean_std(ctx.close, period, ctx.rows)
    close = ctx.last(ctx.close)
    band = 2.0 * num_std * std
    percent_b = _div(close - (mean - num_std * std), band, ZERO_DIVISION_DEFAULTS["bb_percent_b"])
    width = _div(band, mean, ZERO_DIVISION_DEFAULTS["other"])
    return [percent_b, width]


def _atr(ctx: _Ctx, period: int) -> list[FloatArray]:
    prev_close = ctx.close[:-1]
    high, low = ctx.high[1:], ctx.low[1:]
    true_range = np.maximum(high - low, np.maximum(abs(high - prev_close), abs(low - prev_close)))
    atr = _rolling_sum(true_range, period) / period
    return [_div(ctx.last(atr), ctx.last(ctx.close), ZERO_DIVISION_DEFAULTS["other"])]


def _realized_volatility(ctx: _Ctx, period: int) -> list[FloatArray]:
    return [ctx.last(np.sqrt(_rolling_sum(np.square(ctx.ret1), period) / period))]


def _volume_zscore(ctx: _Ctx, period: int) -> list[FloatArray]:
    mean, std = _rolling_mean_std(ctx.volume, period, ctx.rows)
    return [_div(ctx.last(ctx.volume) - mean, std, ZERO_DIVISION_DEFAULTS["other"])]


def _taker_buy_ratio(ctx: _Ctx, period: int) -> list[FloatArray]:
    buy = ctx.last(_rolling_sum(ctx.taker_buy, period))
    vol = ctx.last(_rolling_sum(ctx.volume, period))
    return [_div(buy, vol, ZERO_DIVISION_DEFAULTS["taker_buy_ratio"])]


def _vwap_distance(ctx: _Ctx, period: int) -> list[FloatArray]:
    quote = ctx.last(_rolling_sum(ctx.quote_volume, period))
    vol = ctx.last(_rolling_sum(ctx.volume, period))
    vwap = _div(quote, vol, 0.0)
    # 0 when the window traded nothing (vwap undefined) or on a zero price.
    return [np.where(vwap > 0, _div(ctx.last(ctx.close), vwap, 1.0) - 1.0, 0.0)]


def _candle_shape(ctx: _Ctx) -> list[FloatArray]:
    o, h, lo, c = (ctx.last(x) for x in (ctx.open, ctx.high, ctx.low, ctx.close))
    rng = h - lo
    zero = ZERO_DIVISION_DEFAULTS["other"]
    return [
        _div(c - o, rng, zero),
        _div(h - np.maximum(o, c), rng, zero),
        _div(np.minimum(o, c) - lo, rng, zero),
        _div(rng, c, zero),
    ]


def _time_of_day(ctx: _Ctx) -> list[FloatArray]:
    """Fraction of the UTC day elapsed at the bar's open, in [0, 1)."""
    return [(ctx.last(ctx.open_time) % _DAY_MS) / _DAY_MS]


def _day_of_week(ctx: _Ctx) -> list[FloatArray]:
    """UTC day of week of the bar's open, Monday = 0 (1970-01-01 was a Thursday)."""
    return [((ctx.last(ctx.open_time) // _DAY_MS + 3) % 7).astype(np.float64)]


_INDICATORS: dict[str, Callable[..., list[FloatArray]]] = {
    "log_return": _log_return,
    "rsi": _rsi,
    "macd": _macd,
    "bollinger": _bollinger,
    "atr": _atr,
    "realized_volatility": _realized_volatility,
    "volume_zscore": _volume_zscore,
    "taker_buy_ratio": _taker_buy_ratio,
    "vwap_distance": _vwap_distance,
    "candle_shape": _candle_shape,
    "time_of_day": _time_of_day,
    "day_of_week": _day_of_week,
}


def history_needed(spec: FeatureSpec) -> int:
    """Candles one row of ``spec`` reads: the least lookback that computes it exactly."""
    k = spec.kwargs
    match spec.indicator:
        case "log_return":
            return int(k["periods"]) + 1
        case "rsi" | "atr" | "realized_volatility":
            return int(k["period"]) + 1
        case "macd":  # slow FIR EMA, then the signal FIR EMA over it
            return int(k["taps"]) + int(k["signal_taps"]) - 1
        case "bollinger" | "volume_zscore" | "taker_buy_ratio" | "vwap_distance":
            return int(k["period"])
        case _:
            return 1


_SPEC_OF: dict[str, FeatureSpec] = {name: spec for spec in FEATURES for name in spec.outputs}


class FeatureError(ValueError):
    """A feature selection names an unknown feature or a lookback too short for it."""


@dataclass(frozen=True)
class FeatureSet:
    """The features one model uses: a subset (and order) of :data:`FEATURE_NAMES` computed
    over windows of ``lookback`` candles (the seed's ``FEATURES`` and ``LOOKBACK_PERIODS``).

    Values do not depend on ``lookback`` beyond what each feature needs (every definition is a
    finite window), so a model trained with any selection computes, in the server, exactly what
    training computed. The selection is part of :meth:`definitions_hash`.
    """

    names: tuple[str, ...] = FEATURE_NAMES
    lookback: int = LOOKBACK_PERIODS

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        if not self.names:
            raise FeatureError("FEATURES is empty; name at least one feature")
        unknown = [n for n in self.names if n not in _SPEC_OF]
        if unknown:
            shown = ", ".join(repr(n[:40]) for n in unknown[:5])
            raise FeatureError(
                f"FEATURES names unknown features {shown}; the defined ones are "
                f"{', '.join(FEATURE_NAMES)}"
            )
        if len(set(self.names)) != len(self.names):
            raise FeatureError("FEATURES names a feature twice")
        need = self.min_lookback
        if self.lookback < need:
            short = sorted(
                (
                    f"{n} needs {history_needed(_SPEC_OF[n])}"
                    for n in self.names
                    if history_needed(_SPEC_OF[n]) > self.lookback
                ),
            )
            raise FeatureError(
                f"LOOKBACK_PERIODS={self.lookback} is shorter than the chosen features need "
                f"({need}): {', '.join(short[:6])}"
            )

    @classmethod
    def of(cls, names: list[str] | tuple[str, ...] | None, lookback: int | None) -> FeatureSet:
        """The selection with defaults for what is None."""
        return cls(
            FEATURE_NAMES if names is None else tuple(names),
            LOOKBACK_PERIODS if lookback is None else int(lookback),
        )

    @functools.cached_property
    def plan(self) -> tuple[tuple[FeatureSpec, tuple[int, ...]], ...]:
        """The indicators to run and the output column of each of their outputs (-1: unused)."""
        column = {name: i for i, name in enumerate(self.names)}
        return tuple(
            (spec, tuple(column.get(name, -1) for name in spec.outputs))
            for spec in FEATURES
            if not column.keys().isdisjoint(spec.outputs)
        )

    @property
    def min_lookback(self) -> int:
        return max(history_needed(_SPEC_OF[n]) for n in self.names)

    @property
    def is_default(self) -> bool:
        return self.names == FEATURE_NAMES and self.lookback == LOOKBACK_PERIODS

    def definitions_hash(self) -> str:
        return feature_definitions_hash(self.names, self.lookback)

    def compute(self, candles: Mapping[str, np.ndarray]) -> FloatArray:
        """Feature matrix ``(n, len(names))``; rows with less than ``lookback`` candles of
        history are NaN. Row ``i`` depends only on candles ``i - lookback + 1 .. i``."""
        n = len(candles["close"])
        out = np.full((n, len(self.names)), np.nan, dtype=np.float64)
        first = self.lookback - 1
        for start in range(first, n, _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, n)
            lo = start - first
            chunk = {name: candles[name][lo:stop] for name in CANDLE_FIELDS}
            out[start:stop] = _compute_rows(chunk, self)
        return out

    def window(self, candles: Mapping[str, np.ndarray]) -> FloatArray:
        """Features of the last candle of a window, from its last ``lookback`` candles."""
        n = len(candles["close"])
        if n < self.lookback:
            raise ValueError(f"a feature window needs {self.lookback} candles, got {n}")
        lo = n - self.lookback
        return _compute_rows({name: candles[name][lo:] for name in CANDLE_FIELDS}, self)[0]


DEFAULT_FEATURE_SET = FeatureSet()


def _compute_rows(
    candles: Mapping[str, np.ndarray], selection: FeatureSet = DEFAULT_FEATURE_SET
) -> FloatArray:
    """Features of the last ``m - lookback + 1`` candles of ``m`` candles."""
    ctx = _Ctx(candles, selection.lookback)
    out = np.empty((ctx.rows, len(selection.names)), dtype=np.float64)
    for spec, columns in selection.plan:
        outputs = _INDICATORS[spec.indicator](ctx, **spec.kwargs)
        for column, values in zip(columns, outputs, strict=True):
            if column >= 0:
                out[:, column] = values
    return out


def compute_features(
    candles: Mapping[str, np.ndarray], selection: FeatureSet = DEFAULT_FEATURE_SET
) -> FloatArray:
    """Feature matrix ``(n, len(selection.names))`` of a time-ordered candle series (default:
    every feature over :data:`LOOKBACK_PERIODS`).

    Rows with fewer than ``lookback`` candles of history are NaN. Row ``i`` depends only on
    candles ``i - lookback + 1 .. i``. Computed in chunks so memory stays O(n).
    """
    return selection.compute(candles)


def window_features(
    candles: Mapping[str, np.ndarray], selection: FeatureSet = DEFAULT_FEATURE_SET
) -> FloatArray:
    """Features of the last candle of a window, from its last ``lookback`` candles.

    The server's online path; equals ``compute_features(series)[i]`` for the window ending at i.
    """
    return selection.window(candles)


def candles_from_frame(df: pl.DataFrame) -> dict[str, np.ndarray]:
    """The :data:`CANDLE_FIELDS` columns of a candle frame as numpy arrays."""
    arrays: dict[str, np.ndarray] = {}
    for name in CANDLE_FIELDS:
        dtype = np.int64 if name == "open_time" else np.float64
        arrays[name] = np.array(df.get_column(name).to_numpy(), dtype=dtype)  # owned, writable
    return arrays
