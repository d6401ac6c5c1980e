"""The prediction log's rows in memory: the ring of preallocated column arrays with its index
of id hashes, and rows copied out of it on their way to a part file.

A row takes :func:`row_bytes` (183 bytes for 25 features: no Python object per row); an id of
up to :data:`ID_BYTES` bytes is held inline. :class:`_Rows` is a batch copied out of the ring
(or spilled ahead of it), :func:`_to_table` the part file's table of several.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from xylen_server.learning import arrow_columns as columns
from xylen_server.learning.part_files import SCHEMA

ID_BYTES = 32
"""Bytes of a prediction id held inline per row (the server's own ids take 29 at most); a longer
id is held whole beside the ring (rare: only ids the caller made)."""


def row_bytes(n_features: int) -> int:
    """Memory one remembered prediction takes in the ring and its index, in bytes."""
    return (
        4 * n_features  # float32 features
        + ID_BYTES  # id, inline
        + 8  # id hash
        + 8  # time ms
        + 8  # model version
        + 2  # model name (index into the few names seen)
        + 8  # probability
        + 1  # signal
        + 2 * 8  # two index entries per row (the table is twice the ring)
    )


class _Ring:
    """Preallocated column arrays for ``capacity`` rows of ``width`` features: row ``seq``
    (a running count) lives in slot ``seq % capacity``. No Python object per row."""

    def __init__(self, capacity: int, width: int) -> None:
        self.capacity = capacity
        self.width = width
        self.features = np.zeros((capacity, width), dtype=np.float32)
        self.ids = np.zeros(capacity, dtype=f"S{ID_BYTES}")
        self.hashes = np.zeros(capacity, dtype=np.int64)
        self.times = np.zeros(capacity, dtype=np.int64)
        self.versions = np.zeros(capacity, dtype=np.int64)
        self.names = np.zeros(capacity, dtype=np.uint16)
        self.probabilities = np.zeros(capacity, dtype=np.float64)
        self.signals = np.zeros(capacity, dtype=np.int8)
        self.long_ids: dict[int, str] = {}
        """slot -> whole id, for the ids that do not fit ``ID_BYTES`` inline."""
        size = 1 << max(4, (2 * capacity - 1).bit_length())
        self.mask = size - 1
        self.table = np.zeros(size, dtype=np.int64)
        """Open-addressing index: 0 empty, else 1 + the seq of a row (live or since overwritten,
        told apart by the ring's window and the row's hash)."""
        self.longest_probe = 0
        """The most entries past its home any row was placed at. Entries are reused, never
        emptied, so after some millions of rows hardly any is empty: a lookup stops after this
        many probes instead of at an empty entry (which would be a scan of the whole table)."""

    def nbytes(self) -> int:
        arrays = (
            self.features, self.ids, self.hashes, self.times, self.versions, self.names,
            self.probabilities, self.signals, self.table,
        )  # fmt: skip
        return sum(a.nbytes for a in arrays)

    def slots(self, first: int, stop: int) -> np.ndarray:
        return np.arange(first, stop, dtype=np.int64) % self.capacity


def _index_batch(ring: _Ring, ids: Sequence[str], first: int, start: int) -> int:
    """``PredictionLog.record``'s id columns and index for a big batch, vectorised: the same
    probing as one row at a time, one probe step for all rows at once. Returns the next seq."""
    n = len(ids)
    capacity, table, mask = ring.capacity, ring.table, ring.mask
    seqs = np.arange(first, first + n, dtype=np.int64)
    slots = seqs % capacity
    keys = np.fromiter(map(hash, ids), dtype=np.int64, count=n)
    ring.hashes[slots] = keys
    encoded = [i.encode() for i in ids]
    odd = [k for k, e in enumerate(encoded) if len(e) > ID_BYTES or e.endswith(b"\0")]
    for k in odd:
        encoded[k] = b""
    ring.ids[slots] = encoded
    if ring.long_ids:
        for slot in slots.tolist():
            ring.long_ids.pop(slot, None)
    for k in odd:
        ring.long_ids[int(slots[k])] = ids[k]
    remaining = np.arange(n)
    positions = keys & mask
    probes = -1
    while remaining.size:  # ends: at most half the table is live, the rest is free
        probes += 1
        wanted = positions[remaining]
        free = table[wanted] - 1 < start  # empty, overwritten or forgotten
        candidates = remaining[free]
        # one row per free position (the first in the batch), the others probe on
        _, first_of = np.unique(wanted[free], return_index=True)
        winners = candidates[first_of]
        table[positions[winners]] = seqs[winners] + 1
        taken = np.zeros(n, dtype=bool)
        taken[winners] = True
        remaining = remaining[~taken[remaining]]
        positions[remaining] = (positions[remaining] + 1) & mask
    ring.longest_probe = max(ring.longest_probe, probes)
    return first + n


@dataclass(frozen=True)
class _Rows:
    """Rows copied out of the ring (or taken from a batch) for a part file."""

    ids: pa.Array
    """``pa.string()``."""
    times: np.ndarray
    names: pa.Array
    """``pa.string()``."""
    versions: np.ndarray
    features: np.ndarray
    probabilities: np.ndarray
    signals: np.ndarray
    fixed_ids: np.ndarray | None = None
    """The same ids as the ring holds them (``S32``) when every one was inline: what the
    part's summary reads (:class:`_PartSummary`)."""

    def __len__(self) -> int:
        return len(self.ids)


def _to_table(batches: list[_Rows]) -> pa.Table:
    widths = np.concatenate(
        [np.full(len(batch), batch.features.shape[1], dtype=np.int32) for batch in batches]
    )
    offsets = np.zeros(len(widths) + 1, dtype=np.int32)
    np.cumsum(widths, out=offsets[1:])
    flat = np.concatenate([b.features.ravel() for b in batches])
    return pa.Table.from_arrays(
        [
            pa.chunked_array([b.ids for b in batches], pa.string()),
            columns.fixed(np.concatenate([b.times for b in batches]), SCHEMA.field("time").type),
            pa.chunked_array([b.names for b in batches], pa.string()),
            columns.fixed(np.concatenate([b.versions for b in batches]), pa.int64()),
            columns.float32_lists(offsets, flat),
            columns.fixed(np.concatenate([b.probabilities for b in batches]), pa.float64()),
            columns.fixed(np.concatenate([b.signals for b in batches]), pa.int32()),
        ],
        schema=SCHEMA,
    )


def _coalesce(batches: list[_Rows]) -> list[_Rows]:
    """``batches`` in order, each run of one feature width joined into one batch."""
    runs: list[list[_Rows]] = []
    for batch in batches:
        if runs and runs[-1][0].features.shape[1] == batch.features.shape[1]:
            runs[-1].append(batch)
        else:
            runs.append([batch])
    return [run[0] if len(run) == 1 else _concat(run) for run in runs]


def _concat(batches: list[_Rows]) -> _Rows:
    """``batches`` (of one feature width) as one, in order."""
    return _Rows(
        pa.concat_arrays([b.ids for b in batches]),
        np.concatenate([b.times for b in batches]),
        pa.concat_arrays([b.names for b in batches]),
        np.concatenate([b.versions for b in batches]),
        np.concatenate([b.features for b in batches]),
        np.concatenate([b.probabilities for b in batches]),
        np.concatenate([b.signals for b in batches]),
        None
        if any(b.fixed_ids is None for b in batches)
        else np.concatenate([b.fixed_ids for b in batches]),  # type: ignore[misc]
    )


def _tail(rows: _Rows, n: int) -> _Rows:
    """The newest ``n`` of ``rows``."""
    start = len(rows) - n
    return _Rows(
        rows.ids.slice(start),
        rows.times[start:],
        rows.names.slice(start),
        rows.versions[start:],
        rows.features[start:],
        rows.probabilities[start:],
        rows.signals[start:],
        None if rows.fixed_ids is None else rows.fixed_ids[start:],
    )
