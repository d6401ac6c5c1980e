"""Deterministic offline klines in exactly the Binance Vision format.

The price path has what makes real crypto candles hard: GARCH(1,1) volatility clustering, trend
regimes (a Markov chain over drifts), intraday and weekly seasonality of volatility and volume,
and volume that rises with the size of the move. Candles are consistent (``low <= open, close <=
high``, ``taker_buy <= volume``, ``quote ≈ volume * price``), prices sit on a 0.01 tick.

Files follow the published layout: monthly ``<SYM>-<interval>-<YYYY>-<MM>.zip`` holding one CSV of
the same base name, and ``<zip>.CHECKSUM`` with ``<sha256>  <zip name>`` and no newline. Spot files
have no header, write numbers with 8 decimals and times in milliseconds before 2025 and in
microseconds from 2025-01-01 on; USD-M futures files (``market="um"``) have the header and stay in
milliseconds. A fixed seed gives identical bytes.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from training.klines import FRAME_COLUMNS, KLINE_COLUMNS, checksum_path, interval_ms

FUTURES_HEADER = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
    "taker_buy_volume,taker_buy_quote_volume,ignore\n"
)
#: Spot kline times switch from milliseconds to microseconds at this instant (ms).
SPOT_MICROS_FROM_MS = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000)
_HOUR_MS = 3_600_000
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamp: identical bytes on every run


@dataclass(frozen=True)
class PathParams:
    """Parameters of the simulated market, per hour where a rate is involved."""

    start_price: float = 16_500.0
    hourly_vol: float = 0.006
    garch_alpha: float = 0.08
    garch_beta: float = 0.90
    regime_drifts: tuple[float, ...] = (-1.2e-4, 0.0, 1.5e-4)
    """Drift per hour of each trend regime (bear, flat, bull)."""
    regime_mean_hours: float = 24 * 21
    """Average length of a regime."""
    hourly_volume: float = 1_500.0
    trades_per_unit: float = 30.0
    tick: float = 0.01
    lot: float = 0.00001


def month_starts(start: str, end: str) -> list[datetime]:
    """First instants (UTC) of the months ``start`` .. ``end`` inclusive (``YYYY-MM``)."""
    year, month = map(int, start.split("-"))
    last = tuple(map(int, end.split("-")))
    months = []
    while (year, month) <= last:
        months.append(datetime(year, month, 1, tzinfo=UTC))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    if not months:
        raise ValueError(f"empty month range {start} .. {end}")
    return months


def _to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _next_month(moment: datetime) -> datetime:
    return datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)


def simulate(
    open_times: np.ndarray, step_ms: int, seed: int, params: PathParams | None = None
) -> pl.DataFrame:
    """Candles (columns :data:`FRAME_COLUMNS`, times in ms) at the given open times."""
    p = params or PathParams()
    rng = np.random.default_rng(seed)
    n = len(open_times)
    scale = step_ms / _HOUR_MS
    hour = (open_times % 86_400_000) / _HOUR_MS
    weekday = (open_times // 86_400_000 + 3) % 7
    # Activity peaks with the US/EU overlap (around 14:30 UTC) and falls at weekends.
    peak = np.exp(-(((hour - 14.5) / 3.5) ** 2))
    season = 0.7 + 0.6 * peak + 0.15 * np.cos(hour / 24 * 2 * np.pi)
    season *= np.where(weekday >= 5, 0.75, 1.0)

    # Trend regimes: a Markov chain that leaves its state with probability step/mean length.
    k = len(p.regime_drifts)
    switch = rng.random(n) < scale / p.regime_mean_hours
    jumps = rng.integers(1, k, size=n)  # a switch moves to one of the other regimes
    regime = (rng.integers(k) + np.cumsum(np.where(switch, jumps, 0))) % k
    drift = np.asarray(p.regime_drifts)[regime] * scale

    # GARCH(1,1) with Student-t innovations, unit long-run variance, scaled by the season.
    shocks = rng.standard_t(5, size=n) / np.sqrt(5 / 3)
    var = np.empty(n)
    omega = 1.0 - p.garch_alpha - p.garch_beta
    v, prev = 1.0, 0.0
    for i in range(n):
        v = omega + p.garch_alpha * prev * prev + p.garch_beta * v
        var[i] = v
        prev = shocks[i] * math.sqrt(v)
    sigma = p.hourly_vol * np.sqrt(scale) * np.sqrt(var) * season
    returns = drift + sigma * shocks

    close = np.round(p.start_price * np.exp(np.cumsum(returns)) / p.tick) * p.tick
    open_ = np.round(np.concatenate(([p.start_price], close[:-1])) / p.tick) * p.tick
    wick = sigma * np.abs(rng.normal(0.0, 0.6, size=(2, n)))
    high = np.round(np.maximum(open_, close) * np.exp(wick[0]) / p.tick) * p.tick
    low = np.round(np.minimum(open_, close) * np.exp(-wick[1]) / p.tick) * p.tick
    high = np.maximum(high, np.maximum(open_, close))
    low = np.minimum(low, np.minimum(open_, close))

    move = np.abs(returns) / np.maximum(sigma, 1e-12)
    units = p.hourly_volume * scale * season * (0.6 + 0.4 * move) * rng.lognormal(0, 0.35, n)
    volume = np.round(units / p.lot) * p.lot
    typical = (high + low + close) / 3.0
    quote = volume * typical * (1.0 + rng.normal(0.0, 2e-4, n))
    buy_share = np.clip(0.5 + 0.15 * np.tanh(returns / sigma) + rng.normal(0, 0.04, n), 0.02, 0.98)
    taker_buy = np.minimum(np.round(volume * buy_share / p.lot) * p.lot, volume)
    trades = np.maximum(1, np.round(volume * p.trades_per_unit * rng.lognormal(0, 0.2, n)))

    return pl.DataFrame(
        {
            "open_time": open_times,
            "open": open_,
            "high": high,
            "low": low,
            "close": close,
            "volume": volume,
            "close_time": open_times + step_ms - 1,
            "quote_volume": quote,
            "trades": trades.astype(np.int64),
            "taker_buy_base_volume": taker_buy,
            "taker_buy_quote_volume": taker_buy * typical,
        }
    ).select(FRAME_COLUMNS)


def kline_csv(frame: pl.DataFrame, *, market: str = "spot", header: bool | None = None) -> bytes:
    """The CSV bytes Binance would publish for ``frame`` (times in ms in the frame).

    Spot rows from 2025-01-01 get microsecond times; ``header`` defaults to the market's habit
    (futures yes, spot no).
    """
    if market == "spot":
        micros = pl.col("open_time") >= SPOT_MICROS_FROM_MS
        frame = frame.with_columns(
            pl.when(micros).then(pl.col(c) * 1000 + (c == "close_time") * 999).otherwise(pl.col(c))
            for c in ("open_time", "close_time")
        )
    frame = frame.with_columns(pl.lit(0).alias("ignore")).select(KLINE_COLUMNS)
    body = frame.write_csv(include_header=False, float_precision=8, line_terminator="\n")
    with_header = market != "spot" if header is None else header
    return ((FUTURES_HEADER if with_header else "") + body).encode()


def write_zip(path: Path, csv: bytes, *, checksum: bool = True) -> Path:
    """Write ``csv`` as the only member ``<stem>.csv`` of ``path`` and its ``.CHECKSUM``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = zipfile.ZipInfo(f"{path.stem}.csv", date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(info, csv, compresslevel=1)
    if checksum:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        checksum_path(path).write_text(f"{digest}  {path.name}")
    return path


def generate(
    out: Path,
    *,
    symbol: str = "BTCUSDT",
    interval: str = "1h",
    start: str = "2023-01",
    end: str = "2024-12",
    seed: int = 7,
    market: str = "spot",
    params: PathParams | None = None,
) -> list[Path]:
    """Write monthly kline zips (+ CHECKSUM) for ``start`` .. ``end``; returns the zip paths."""
    step = interval_ms(interval)
    months = month_starts(start, end)
    first = _to_ms(months[0])
    stop = _to_ms(_next_month(months[-1]))
    frame = simulate(np.arange(first, stop, step, dtype=np.int64), step, seed, params)
    paths = []
    for moment in months:
        lo = _to_ms(moment)
        hi = _to_ms(_next_month(moment))
        rows = frame.filter((pl.col("open_time") >= lo) & (pl.col("open_time") < hi))
        name = f"{symbol}-{interval}-{moment:%Y-%m}.zip"
        paths.append(write_zip(out / name, kline_csv(rows, market=market)))
    return paths
