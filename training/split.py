"""Splits by time with a gap: train, then validation, then test, never shuffled.

Between periods lies a gap of at least ``horizon + lookback`` bars, so no training label reaches
a candle that a validation feature reads, and no two periods share a feature window.
``TRAIN_START_DATE`` / ``TRAIN_END_DATE`` (the names operators configure) bound the training
period (both dates inclusive); the rest of the data after the gap is halved into validation and
test unless their ends are given. Without training dates the data's own span is split by
fraction (:func:`fraction_split`, 60 / 20 / 20 by default), so any data trains as it is.
Walk-forward folds repeat this on consecutive blocks with an expanding training window.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np

_DAY_MS = 86_400_000


def date_ms(value: str | date) -> int:
    """Epoch ms of midnight UTC of a date (``YYYY-MM-DD``)."""
    day = value if isinstance(value, date) else date.fromisoformat(value)
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def iso_ms(ms: int) -> str:
    """ISO-8601 UTC text of an epoch-ms instant."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(ms))
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class TimeSplit:
    """Row indices of each period (ascending) and its bounds in epoch ms, ``[start, end)``."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    bounds: dict[str, tuple[int, int]]
    gap_ms: int


def min_gap_bars(horizon: int, lookback: int) -> int:
    return horizon + lookback


def split_by_bounds(
    open_time: np.ndarray,
    usable: np.ndarray,
    bounds: dict[str, tuple[int, int]],
    gap_ms: int,
) -> TimeSplit:
    """Rows of each period among ``usable`` rows (finite features and label)."""
    open_time = np.asarray(open_time, dtype=np.int64)
    parts = {}
    for name, (lo, hi) in bounds.items():
        parts[name] = np.flatnonzero(usable & (open_time >= lo) & (open_time < hi))
    return TimeSplit(parts["train"], parts["validation"], parts["test"], bounds, gap_ms)


def time_split(
    open_time: np.ndarray,
    usable: np.ndarray,
    *,
    train_start: str,
    train_end: str,
    step_ms: int,
    gap_bars: int,
    validation_end: str | None = None,
    test_end: str | None = None,
) -> TimeSplit:
    """Train on ``[train_start, train_end]`` (dates, inclusive), validate and test after gaps."""
    gap_ms = gap_bars * step_ms
    train = (date_ms(train_start), date_ms(train_end) + _DAY_MS)
    if train[1] <= train[0]:
        raise ValueError(f"TRAIN_END_DATE {train_end} is before TRAIN_START_DATE {train_start}")
    data_end = int(np.max(open_time)) + step_ms if len(open_time) else train[1]
    last = date_ms(test_end) + _DAY_MS if test_end else data_end
    valid_start = train[1] + gap_ms
    if validation_end:
        valid_end = date_ms(validation_end) + _DAY_MS
    else:  # halve what follows the first gap, leaving room for the second
        valid_end = valid_start + max(0, last - valid_start - gap_ms) // 2
    bounds = {
        "train": train,
        "validation": (valid_start, valid_end),
        "test": (valid_end + gap_ms, last),
    }
    return split_by_bounds(open_time, usable, bounds, gap_ms)


def fraction_split(
    open_time: np.ndarray,
    usable: np.ndarray,
    *,
    train_fraction: float,
    validation_fraction: float,
    step_ms: int,
    gap_bars: int,
    train_start: str | None = None,
) -> TimeSplit:
    """Split the span of the usable rows (from ``train_start`` when given) by time: the first
    ``train_fraction`` trains, the next ``validation_fraction`` validates, the rest tests; each
    later period starts after a gap of ``gap_bars`` taken from its own share."""
    open_time = np.asarray(open_time, dtype=np.int64)
    rows = usable.copy()
    if train_start:
        rows &= open_time >= date_ms(train_start)
    if not rows.any():
        where = f" from TRAIN_START_DATE {train_start}" if train_start else ""
        raise ValueError(f"no usable rows{where} to split")
    start = int(open_time[rows].min())
    end = int(open_time[rows].max()) + step_ms
    span = end - start
    train_end = start + int(span * train_fraction)
    valid_end = start + int(span * (train_fraction + validation_fraction))
    gap_ms = gap_bars * step_ms
    bounds = {
        "train": (start, train_end),
        "validation": (train_end + gap_ms, valid_end),
        "test": (valid_end + gap_ms, end),
    }
    return split_by_bounds(open_time, usable, bounds, gap_ms)


def walk_forward(
    open_time: np.ndarray,
    usable: np.ndarray,
    *,
    folds: int,
    step_ms: int,
    gap_bars: int,
) -> list[TimeSplit]:
    """``folds`` expanding-window splits over ``folds + 2`` equal blocks of time.

    Fold k trains on blocks ``0..k``, validates on block ``k + 1`` and tests on block ``k + 2``,
    each after a gap.
    """
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    start, end = int(np.min(open_time)), int(np.max(open_time)) + step_ms
    edges = np.linspace(start, end, folds + 3).astype(np.int64)
    gap_ms = gap_bars * step_ms
    splits = []
    for k in range(folds):
        bounds = {
            "train": (start, int(edges[k + 1])),
            "validation": (int(edges[k + 1]) + gap_ms, int(edges[k + 2])),
            "test": (int(edges[k + 2]) + gap_ms, int(edges[k + 3])),
        }
        splits.append(split_by_bounds(open_time, usable, bounds, gap_ms))
    return splits
