"""Turning a PredictRequest into the float32 feature matrix a model runs on, or refusing it.

Each refusal is an :class:`InvalidArgument` (or :class:`ResourceExhausted` for size) whose reason
names the problem and whose metadata points at the row, so a client can fix exactly that row.
Candle windows become features through :func:`training.features.window_features`, the code
training uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from training import features
from training.onnx_export import model_input
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.errors import InvalidArgument, ResourceExhausted

_F32_MAX = float(np.finfo(np.float32).max)


def feature_matrix(
    inputs: Sequence[pb.PredictInput], n_features: int, lookback: int, max_rows: int
) -> np.ndarray:
    """A validated float32 (rows, n_features) matrix for the request's inputs."""
    if not inputs:
        raise InvalidArgument(
            "the request has no inputs; send at least one row", reason="EMPTY_BATCH"
        )
    if len(inputs) > max_rows:
        raise ResourceExhausted(
            f"the request has {len(inputs)} rows, more than the limit of {max_rows}",
            reason="BATCH_TOO_LARGE",
            rows=len(inputs),
            limit=max_rows,
        )
    matrix = np.empty((len(inputs), n_features), dtype=np.float64)
    for index, item in enumerate(inputs):
        kind = item.WhichOneof("input")
        if kind == "features":
            values = item.features.values
            if len(values) != n_features:
                raise InvalidArgument(
                    f"row {index} has {len(values)} feature values, the model takes {n_features}",
                    reason="FEATURE_COUNT_MISMATCH",
                    row=index,
                    expected=n_features,
                    got=len(values),
                )
            matrix[index] = values
        elif kind == "candles":
            matrix[index] = candle_features(item.candles.candles, lookback, index)
        else:
            raise InvalidArgument(
                f"row {index} has neither features nor candles", reason="MISSING_INPUT", row=index
            )
    # One pass catches NaN (never <=), infinities and values float32 cannot hold.
    if not (np.abs(matrix) <= _F32_MAX).all():
        _refuse_values(matrix)
    return model_input(matrix)


def _refuse_values(matrix: np.ndarray) -> None:
    """Raise the error for the first value that is not finite or does not fit float32."""
    if not np.isfinite(matrix).all():
        row, column = (int(v) for v in np.argwhere(~np.isfinite(matrix))[0])
        raise InvalidArgument(
            f"row {row} feature {features.FEATURE_NAMES[column]!r} is {matrix[row, column]}; "
            "feature values must be finite",
            reason="NON_FINITE_FEATURE",
            row=row,
            feature=features.FEATURE_NAMES[column],
        )
    row, column = (int(v) for v in np.argwhere(np.abs(matrix) > _F32_MAX)[0])
    raise InvalidArgument(
        f"row {row} feature {features.FEATURE_NAMES[column]!r} is {matrix[row, column]:g}, "
        "outside the float32 range the model runs in",
        reason="FEATURE_OUT_OF_RANGE",
        row=row,
        feature=features.FEATURE_NAMES[column],
    )


def candle_features(candles: Sequence[types_pb2.Candle], lookback: int, row: int) -> np.ndarray:
    """Features of the last candle of a validated window (float64)."""
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
    columns = {
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
    return features.window_features(columns)
