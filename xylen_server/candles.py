"""Candle windows between protobuf and arrays: the contract's ``CandleWindow`` to validated
columns (what the feature code reads), and columns back to a ``PredictInput``.

Import-light on purpose (numpy and the generated messages only): the coordinator validates and
featurises windows with it too. Each refusal is an :class:`~xylen_server.errors.InvalidArgument`
whose reason names the problem and whose metadata points at the row and candle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.errors import InvalidArgument

#: google.protobuf.Timestamp's documented range: 0001-01-01T00:00:00Z ..
#: 9999-12-31T23:59:59Z, nanos in [0, 999999999].
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799


def window_columns(
    candles: Sequence[types_pb2.Candle], lookback: int, row: int
) -> dict[str, np.ndarray]:
    """The last ``lookback`` candles of a validated window as the columns the features read
    (``open_time`` int64 epoch ms, the rest float64), oldest first.

    Every candle of the window must have an open time (a valid Timestamp), strictly
    increasing; the last
    ``lookback`` must be finite and consistent (0 < low <= open, close <= high, volume >= 0,
    0 <= taker buy volume <= volume). ``row`` is the window's index in the request, for the
    error's metadata.
    """
    if len(candles) < lookback:
        raise InvalidArgument(
            f"row {row} has a window of {len(candles)} candles; the model needs {lookback}",
            reason="WINDOW_TOO_SHORT",
            row=row,
            expected=lookback,
            got=len(candles),
        )
    window = candles[-lookback:] if len(candles) > lookback else candles
    for position, candle in enumerate(candles):
        if not candle.HasField("open_time"):
            raise InvalidArgument(
                f"row {row} candle {position} has no open_time",
                reason="MISSING_OPEN_TIME",
                row=row,
                candle=position,
            )
        stamp = candle.open_time
        if not (
            MIN_TIMESTAMP_SECONDS <= stamp.seconds <= MAX_TIMESTAMP_SECONDS
            and 0 <= stamp.nanos <= 999_999_999
        ):
            raise InvalidArgument(
                f"row {row} candle {position} has an open_time outside "
                "0001-01-01..9999-12-31 or nanos outside [0, 999999999]",
                reason="INVALID_TIMESTAMP",
                row=row,
                candle=position,
            )
    open_time = np.array(
        [c.open_time.seconds * 1000 + c.open_time.nanos // 1_000_000 for c in candles],
        dtype=np.int64,
    )
    steps = np.diff(open_time)
    if (steps == 0).any():
        position = int(np.argmax(steps == 0)) + 1
        raise InvalidArgument(
            f"row {row} candle {position} repeats the open_time of the candle before it",
            reason="CANDLES_DUPLICATED",
            row=row,
            candle=position,
        )
    if (steps < 0).any():
        position = int(np.argmax(steps < 0)) + 1
        raise InvalidArgument(
            f"row {row} candle {position} opens before the candle before it; candles must be "
            "oldest first",
            reason="CANDLES_OUT_OF_ORDER",
            row=row,
            candle=position,
        )
    fields = np.array(
        [
            (
                c.open,
                c.high,
                c.low,
                c.close,
                c.volume,
                c.quote_volume,
                c.trade_count,
                c.taker_buy_base_volume,
            )
            for c in window
        ],
        dtype=np.float64,
    )
    if not np.isfinite(fields).all():
        position = len(candles) - len(window) + int(np.argwhere(~np.isfinite(fields))[0][0])
        raise InvalidArgument(
            f"row {row} candle {position} has a non-finite value",
            reason="NON_FINITE_CANDLE",
            row=row,
            candle=position,
        )
    o, h, low, c, volume, quote, trades, taker = np.ascontiguousarray(fields.T)
    bad = (low <= 0) | (low > np.minimum(o, c)) | (h < np.maximum(o, c)) | (volume < 0)
    bad |= (taker < 0) | (taker > volume * (1 + 1e-9))
    if bad.any():
        position = len(candles) - len(window) + int(np.argmax(bad))
        raise InvalidArgument(
            f"row {row} candle {position} is inconsistent: need 0 < low <= open, close <= high, "
            "volume >= 0 and 0 <= taker_buy_base_volume <= volume",
            reason="INVALID_CANDLE",
            row=row,
            candle=position,
        )
    return {
        "open_time": open_time[-len(window) :],
        "open": o,
        "high": h,
        "low": low,
        "close": c,
        "volume": volume,
        "quote_volume": quote,
        "trades": trades,
        "taker_buy_base_volume": taker,
    }


def window_input(candles: Mapping[str, np.ndarray], end: int, length: int) -> pb.PredictInput:
    """The ``length`` candles ending at index ``end`` of candle columns as one PredictInput."""
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
