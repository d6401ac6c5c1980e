"""Candle windows for the CLI: a Binance Vision kline CSV/zip turned into ``PredictInput``s."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2

#: Times at or above this are microseconds (spot files from 2025), below milliseconds.
_MICROS = 10**15


def read_candles(path: Path) -> dict[str, np.ndarray]:
    """open_time (ms), OHLCV, quote volume, trades and taker-buy volume, oldest first.

    Uses the training loader (checksums, de-duplication, anomaly policy) when it is importable,
    else reads the 12 columns by position itself (header sniffed, µs times normalised).
    """
    try:
        from training.klines import load_klines
    except ImportError:
        return _read_plain(path)
    frame = load_klines(path).frame
    return {
        "open_time": frame["open_time"].to_numpy().astype(np.int64),
        **{
            name: frame[name].to_numpy().astype(np.float64)
            for name in (
                "open",
                "high",
                "low",
                "close",
                "volume",
                "quote_volume",
                "trades",
                "taker_buy_base_volume",
            )
        },
    }


def _read_plain(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            text = archive.read(archive.namelist()[0]).decode()
    else:
        text = path.read_text()
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if rows and not rows[0][0].strip().isdigit():
        rows = rows[1:]
    rows.sort(key=lambda r: int(r[0]))
    columns = list(zip(*rows, strict=False))
    open_time = np.array([int(v) for v in columns[0]], dtype=np.int64)
    open_time = np.where(open_time >= _MICROS, open_time // 1000, open_time)
    index = {"open": 1, "high": 2, "low": 3, "close": 4, "volume": 5, "quote_volume": 7}
    out = {"open_time": open_time}
    for name, i in index.items():
        out[name] = np.array(columns[i], dtype=np.float64)
    out["trades"] = np.array(columns[8], dtype=np.float64)
    out["taker_buy_base_volume"] = np.array(columns[9], dtype=np.float64)
    return out


def window_input(candles: dict[str, np.ndarray], end: int, length: int) -> pb.PredictInput:
    """The ``length`` candles ending at index ``end`` as one PredictInput."""
    window = types_pb2.CandleWindow()
    for i in range(end - length + 1, end + 1):
        candle = window.candles.add(
            open=float(candles["open"][i]),
            high=float(candles["high"][i]),
            low=float(candles["low"][i]),
            close=float(candles["close"][i]),
            volume=float(candles["volume"][i]),
            quote_volume=float(candles["quote_volume"][i]),
            trade_count=int(candles["trades"][i]),
            taker_buy_base_volume=float(candles["taker_buy_base_volume"][i]),
        )
        candle.open_time.FromMilliseconds(int(candles["open_time"][i]))
    return pb.PredictInput(candles=window)
