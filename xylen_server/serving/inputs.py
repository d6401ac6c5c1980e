"""Turning a PredictRequest into the feature matrix a model runs on, or refusing it.

Each refusal is an :class:`InvalidArgument` (or :class:`ResourceExhausted` for size) whose reason
names the problem and whose metadata points at the row, so a client can fix exactly that row.
Candle windows are validated by :mod:`xylen_server.candles` and become features through
:func:`training.features.window_features`, the code training uses.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import numpy as np

from training import features
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.candles import window_columns
from xylen_server.errors import InvalidArgument, ResourceExhausted

_F32_MAX = float(np.finfo(np.float32).max)
_F32_MAX_SQUARED = _F32_MAX * _F32_MAX
_DOT_MAX_VALUES = 4096
"""Most values judged by a dot product first (:func:`_within_float32`)."""

# A value beyond ~1.3e154 squares to infinity: numpy warns of the overflow, on input that the
# exact test then refuses anyway. Only that warning of this module is silenced (numpy's
# errstate around each dot product would cost more than the shortcut saves).
warnings.filterwarnings(
    "ignore", "overflow encountered in dot", RuntimeWarning, module=re.escape(__name__)
)


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
    first = inputs[0]
    if len(inputs) == 1 and first.HasField("features"):  # the common case, without a loop
        matrix = _feature_row(first.features.values, n_features, 0).reshape(1, n_features)
    else:
        matrix = np.empty((len(inputs), n_features), dtype=np.float64)
        for index, item in enumerate(inputs):
            kind = item.WhichOneof("input")
            if kind == "features":
                matrix[index] = _feature_row(item.features.values, n_features, index)
            elif kind == "candles":
                matrix[index] = candle_features(item.candles.candles, selection, index)
            else:
                raise InvalidArgument(
                    f"row {index} has neither features nor candles",
                    reason="MISSING_INPUT",
                    row=index,
                )
    if not _within_float32(matrix):
        _refuse_values(matrix, selection.names)
    return matrix


_TINY = 2e-35
"""Values at or below this size (but +0.0) may meet the float32 zero snap of
:func:`~training.metadata.model_input` (float32's rounding is monotonic, so anything larger
stays above its 1e-35 threshold): :func:`feature_values` leaves them to the matrix path."""


def feature_values(values: Sequence[float], n_features: int) -> list[float] | None:
    """One row's feature values as a Python list, when the model takes them as they are: as
    many as ``n_features``, each finite, within float32's range and not small enough to be
    snapped to zero (+0.0 is). None otherwise: the row then takes :func:`feature_rows`, which
    snaps, or refuses it naming the value. A lone row on the loop goes into the engine's own
    buffer from this list (:meth:`~xylen_server.serving.session_pool.SessionPool.predict_value`),
    without the matrix, the float32 copy and their checks (nine numpy calls).

    Four passes in C decide a usual row: a finite sum rules out NaN and infinities (either
    makes the sum NaN or infinite), so ``min`` and ``max`` are exact and bound every value,
    and the smallest size is above the snap's reach. A row they cannot clear (a zero, a tiny
    value, finite values whose sum overflows) is judged value by value."""
    if len(values) != n_features:
        return None
    row = list(values)
    if (
        math.isfinite(sum(row))
        and min(row) >= -_F32_MAX
        and max(row) <= _F32_MAX
        and min(map(abs, row)) > _TINY
    ):
        return row
    for value in row:
        if -_F32_MAX <= value <= _F32_MAX:  # False for NaN and infinities
            if -_TINY <= value <= _TINY and (value or math.copysign(1.0, value) < 0.0):
                return None  # snapped to +0.0 by model_input (-0.0 too)
        else:
            return None
    return row


def _feature_row(values: Sequence[float], n_features: int, index: int) -> np.ndarray:
    """Row ``index``'s feature values as float64, or FEATURE_COUNT_MISMATCH."""
    if len(values) != n_features:
        raise InvalidArgument(
            f"row {index} has {len(values)} feature values, the model takes {n_features}",
            reason="FEATURE_COUNT_MISMATCH",
            row=index,
            expected=n_features,
            got=len(values),
        )
    return np.fromiter(values, np.float64, n_features)  # 3x a row assignment


def _within_float32(matrix: np.ndarray) -> bool:
    """Every value is finite and within float32's range.

    A small matrix is judged by its sum of squares first (one dot product, a third of the
    cost of ``abs`` and ``max``): a sum below float32's largest value squared proves every
    value is (a NaN, an infinity or a value beyond the range makes it NaN, infinite or at
    least that square: rounding is monotonic and every term is non-negative), so only a sum
    at or above it (very large but possibly valid values) takes the exact test. Big
    matrices take the exact test at once (a long dot product may start BLAS threads). The
    exact test: one reduction catches NaN (max propagates it, and NaN is never <=),
    infinities and values float32 cannot hold."""
    if matrix.size <= _DOT_MAX_VALUES:
        flat = matrix.ravel()
        if flat.dot(flat) < _F32_MAX_SQUARED:
            return True
    return bool(np.abs(matrix).max() <= _F32_MAX)


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
