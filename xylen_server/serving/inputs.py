"""Turning a PredictRequest into the feature matrix a model runs on, or refusing it.

Each refusal is an :class:`InvalidArgument` (or :class:`ResourceExhausted` for size) whose reason
names the problem and whose metadata points at the row, so a client can fix exactly that row.
Candle windows are validated by :mod:`xylen_server.candles` and become features through
:func:`training.features.window_features`, the code training uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from training import features
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.candles import window_columns
from xylen_server.errors import InvalidArgument, ResourceExhausted

_F32_MAX = float(np.finfo(np.float32).max)


def feature_rows(
    inputs: Sequence[pb.PredictInput],
    n_features: int,
    lookback: int,
    max_rows: int,
    selection: features.FeatureSet | None = None,
) -> np.ndarray:
    """The validated float64 (rows, n_features) matrix of the request's inputs (every value
    finite and within float32's range); candle windows become the model's features
    (``selection``, default every feature over ``lookback``). The engines take it through
    :func:`~training.metadata.model_input`, once for the rows of several requests put
    together (a batch on the loop does)."""
    if selection is None:
        selection = features.FeatureSet.of(None, lookback)
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
            matrix[index] = np.fromiter(values, np.float64, n_features)  # 3x a row assignment
        elif kind == "candles":
            matrix[index] = candle_features(item.candles.candles, selection, index)
        else:
            raise InvalidArgument(
                f"row {index} has neither features nor candles", reason="MISSING_INPUT", row=index
            )
    # One reduction catches NaN (max propagates it, and NaN is never <=), infinities and
    # values float32 cannot hold.
    if not np.abs(matrix).max() <= _F32_MAX:
        _refuse_values(matrix, selection.names)
    return matrix


def _refuse_values(matrix: np.ndarray, names: Sequence[str]) -> None:
    """Raise the error for the first value that is not finite or does not fit float32."""
    if not np.isfinite(matrix).all():
        row, column = (int(v) for v in np.argwhere(~np.isfinite(matrix))[0])
        raise InvalidArgument(
            f"row {row} feature {names[column]!r} is {matrix[row, column]}; "
            "feature values must be finite",
            reason="NON_FINITE_FEATURE",
            row=row,
            feature=names[column],
        )
    row, column = (int(v) for v in np.argwhere(np.abs(matrix) > _F32_MAX)[0])
    raise InvalidArgument(
        f"row {row} feature {names[column]!r} is {matrix[row, column]:g}, "
        "outside the float32 range the model runs in",
        reason="FEATURE_OUT_OF_RANGE",
        row=row,
        feature=names[column],
    )


def candle_features(
    candles: Sequence[types_pb2.Candle], selection: features.FeatureSet, row: int
) -> np.ndarray:
    """The model's features (float64) of the last candle of a window, validated by
    :func:`~xylen_server.candles.window_columns`."""
    return selection.window(window_columns(candles, selection.lookback, row))
