"""The feedback samples directory: its layout, its record schema, and the one reader of it.

A model server stores the outcomes fed back to it (:mod:`~xylen_server.learning.feedback_store`
writes them) under its learning directory::

    feedback.sqlite3 (-wal, -shm)                    SQLite, WAL mode, synchronous=FULL
    training_samples/part-<lo seq>-<hi seq>.parquet  Snappy Parquet: the samples lo..hi
    feedback.lock                                    flock of the one process writing here

SQLite tables (:data:`SQL_SCHEMA`):

* ``stored_ids (prediction_id TEXT PRIMARY KEY)``: every prediction id ever stored. It is
  never emptied, so an id is stored once for good, also after its sample moved to Parquet.
* ``samples``: the samples not yet compacted, one row each: ``seq INTEGER PRIMARY KEY`` (the
  arrival order; every sample gets its own, never reused), ``prediction_id``, ``model_name``,
  ``model_version`` (NULL when the prediction was no longer in the prediction log),
  ``features`` (BLOB: the float32 row, little-endian), ``probability_up`` and ``signal``
  (NULL likewise), ``pnl``, ``realized_return``, ``close_time_ms`` and ``received_time_ms``
  (UTC milliseconds since the epoch), ``source`` (who sent the outcome: ``token:admin``,
  ``mtls:<identity>``, or ``anonymous`` from an unauthenticated caller; NULL for samples
  stored before sources were recorded, which count as anonymous), then (added later, so a
  store written before has them NULL) ``label`` (the training label, see below), ``side``
  (``xylen.v1.TradeSide`` value) and ``underlying_log_return`` (as the outcome sent it; NULL
  when it was derived from the side).

Compaction writes the samples with ``seq`` lo..hi to ``part-<lo>-<hi>.parquet`` (through an
fsynced ``.tmp`` file renamed into place), then deletes them from ``samples``. Rows of
``samples`` whose ``seq`` is at most the highest ``hi`` of a part are therefore already in
Parquet (a crash came between the rename and the delete) and are deleted at the next open.

Parquet columns (:data:`SCHEMA`, one row per prediction id): ``prediction_id`` string,
``model_name`` string, ``model_version`` int64 (nullable), ``features`` list<float32> (one list
per row, in the model's ``feature_names`` order, so models with different feature sets share
one dataset), ``probability_up`` float64 (nullable), ``signal`` int32 (``xylen.v1.Signal``
value, nullable), ``pnl`` float64, ``realized_return`` float64, ``close_time`` and
``received_time`` timestamp[ms, UTC], ``label`` int8, ``source`` string (nullable; missing
from parts written before it was recorded, read as null), ``side`` int32 (nullable),
``underlying_log_return`` float64 (nullable).

``label`` is the training label of the predicted bar, computed when the outcome is stored by
``training.labels.label_from_return`` with the model's horizon, fee and label threshold (see
:func:`xylen_server.learning.feedback.outcome_label`): 1 when the underlying's move over the
horizon net of the fee beats the threshold, whatever the trade's side. Samples stored before
labels were computed this way (``label`` NULL in SQLite; parts without the ``side`` column)
keep their old label, ``realized_return > 0``.

:func:`read_samples` is how the server and the retrain job read it, safely while the server
keeps appending and compacting.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from xylen_server.auth import ANONYMOUS
from xylen_server.durable import sqlite_connect
from xylen_server.learning import arrow_columns as columns

if TYPE_CHECKING:
    import polars as pl

DB_NAME = "feedback.sqlite3"
PARTS_DIR = "training_samples"

SQL_SCHEMA = """
CREATE TABLE IF NOT EXISTS stored_ids (prediction_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY,
    prediction_id TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version INTEGER,
    features BLOB NOT NULL,
    probability_up REAL,
    signal INTEGER,
    pnl REAL NOT NULL,
    realized_return REAL NOT NULL,
    close_time_ms INTEGER NOT NULL,
    received_time_ms INTEGER NOT NULL,
    source TEXT,
    label INTEGER,
    side INTEGER,
    underlying_log_return REAL
);
"""
"""The SQLite tables of a samples directory (see the module docstring)."""

SAMPLE_COLUMNS = (
    "seq, prediction_id, model_name, model_version, features, probability_up, signal, pnl, "
    "realized_return, close_time_ms, received_time_ms, source, label, side, "
    "underlying_log_return"
)
"""The columns of ``samples``, in :func:`sample_row`'s order."""

SCHEMA = pa.schema(
    [
        pa.field("prediction_id", pa.string(), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.int64()),
        pa.field("features", pa.list_(pa.float32()), nullable=False),
        pa.field("probability_up", pa.float64()),
        pa.field("signal", pa.int32()),
        pa.field("pnl", pa.float64(), nullable=False),
        pa.field("realized_return", pa.float64(), nullable=False),
        pa.field("close_time", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("received_time", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("side", pa.int32()),
        pa.field("underlying_log_return", pa.float64()),
    ]
)

"""The Parquet schema of the training samples."""

ADDED_COLUMNS = (
    ("source", "TEXT"),
    ("label", "INTEGER"),
    ("side", "INTEGER"),
    ("underlying_log_return", "REAL"),
)
"""Columns of ``samples`` added after the first release, in :data:`SQL_SCHEMA` order: a store
opened from before gets them (:func:`add_missing_columns`), NULL in its old rows."""


@dataclass(frozen=True)
class FeedbackRecord:
    """One trade outcome joined to the features the model predicted on."""

    prediction_id: str
    model_name: str
    model_version: int | None
    features: np.ndarray
    """float32 feature row."""
    probability_up: float | None
    signal: int | None
    pnl: float
    realized_return: float
    close_time_ms: int
    """When the trade closed, UTC milliseconds since the epoch."""
    received_time_ms: int
    """When the server accepted the outcome, UTC milliseconds since the epoch."""
    label: int
    """The training label of the predicted bar (1 up, 0 not): ``label_from_return`` of the
    underlying's move over the model's horizon, net of its fee (never the trade's profit)."""
    source: str = ANONYMOUS
    """Who sent it (:func:`xylen_server.auth.caller`): the gate scores only on samples from
    authenticated callers."""
    side: int = 0
    """``xylen.v1.TradeSide`` value of the trade (0: not sent)."""
    underlying_log_return: float | None = None
    """The underlying's log return over the horizon as the outcome sent it (None: derived from
    ``side`` and ``realized_return``)."""

    def check_storable(self) -> None:
        """Raise ValueError unless every value survives the round trip through SQLite and
        Parquet unchanged (Feedback validates requests before; this guards the store)."""
        floats = (
            self.pnl,
            self.realized_return,
            self.probability_up or 0.0,
            self.underlying_log_return or 0.0,
        )
        if not all(math.isfinite(value) for value in floats):
            raise ValueError(f"record {self.prediction_id[:64]!r}: a value is not finite")
        if self.features.dtype != np.float32 or not np.isfinite(self.features).all():
            raise ValueError(f"record {self.prediction_id[:64]!r}: features not finite float32")
        if self.label not in (0, 1):
            raise ValueError(f"record {self.prediction_id[:64]!r}: label {self.label} not 0/1")


def sample_row(seq: int, record: FeedbackRecord) -> tuple[Any, ...]:
    """``record`` as a row of the ``samples`` table (:data:`SAMPLE_COLUMNS`)."""
    return (
        seq,
        record.prediction_id,
        record.model_name,
        record.model_version,
        record.features.astype("<f4", copy=False).tobytes(),
        record.probability_up,
        record.signal,
        record.pnl,
        record.realized_return,
        record.close_time_ms,
        record.received_time_ms,
        record.source,
        record.label,
        record.side,
        record.underlying_log_return,
    )


def _table(
    ids: Sequence[str],
    names: Sequence[str],
    versions: Sequence[int | None],
    widths: Sequence[int],
    flat: np.ndarray,
    probabilities: Sequence[float | None],
    signals: Sequence[int | None],
    pnls: Sequence[float],
    returns: Sequence[float],
    close_ms: Sequence[int],
    received_ms: Sequence[int],
    sources: Sequence[str | None],
    labels: Sequence[int | None],
    sides: Sequence[int | None],
    underlying: Sequence[float | None],
) -> pa.Table:
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(np.asarray(widths, dtype=np.int32), out=offsets[1:])
    realized = np.asarray(returns, dtype=np.float64)
    # A NULL label is a row stored before labels were computed at store time: its old label.
    label = np.array([-1 if v is None else v for v in labels], dtype=np.int8).reshape(-1)
    label = np.where(label < 0, (realized > 0).astype(np.int8), label).astype(np.int8)
    return pa.Table.from_arrays(
        [
            columns.strings(ids),
            columns.strings(names),
            columns.nullable(versions, pa.int64()),
            columns.float32_lists(offsets, np.asarray(flat, dtype=np.float32)),
            columns.nullable(probabilities, pa.float64()),
            columns.nullable(signals, pa.int32()),
            columns.fixed(pnls, pa.float64()),
            columns.fixed(realized, pa.float64()),
            columns.fixed(close_ms, SCHEMA.field("close_time").type),
            columns.fixed(received_ms, SCHEMA.field("received_time").type),
            columns.fixed(label, pa.int8()),
            columns.strings(sources),
            columns.nullable(sides, pa.int32()),
            columns.nullable(underlying, pa.float64()),
        ],
        schema=SCHEMA,
    )


def records_table(records: Sequence[FeedbackRecord]) -> pa.Table:
    """``records`` as an Arrow table in :data:`SCHEMA`."""
    flat = (
        np.concatenate([r.features for r in records]).astype(np.float32, copy=False)
        if records
        else np.empty(0, np.float32)
    )

    def column(name: str) -> list[Any]:
        return [getattr(r, name) for r in records]

    return _table(
        column("prediction_id"),
        column("model_name"),
        column("model_version"),
        [len(r.features) for r in records],
        flat,
        column("probability_up"),
        column("signal"),
        column("pnl"),
        column("realized_return"),
        column("close_time_ms"),
        column("received_time_ms"),
        column("source"),
        column("label"),
        column("side"),
        column("underlying_log_return"),
    )


def uncompacted(db: sqlite3.Connection, after_seq: int = 0) -> tuple[pa.Table, int, int]:
    """The samples still in SQLite with ``seq`` above ``after_seq``, oldest first, as an Arrow
    table in :data:`SCHEMA`, with the first and last ``seq`` (0, 0 when there are none).
    One read transaction: a consistent snapshot while a writer commits."""
    rows = db.execute(
        f"SELECT {SAMPLE_COLUMNS} FROM samples WHERE seq > ? ORDER BY seq", (after_seq,)
    ).fetchall()
    if not rows:
        return records_table([]), 0, 0
    (
        seqs,
        ids,
        names,
        versions,
        blobs,
        probs,
        signals,
        pnls,
        rets,
        close,
        received,
        sources,
        labels,
        sides,
        underlying,
    ) = zip(*rows, strict=True)
    flat = np.frombuffer(b"".join(blobs), dtype="<f4")
    table = _table(
        ids,
        names,
        versions,
        [len(blob) // 4 for blob in blobs],
        flat,
        probs,
        signals,
        pnls,
        rets,
        close,
        received,
        sources,
        labels,
        sides,
        underlying,
    )
    return table, seqs[0], seqs[-1]


def read_samples(directory: Path) -> pl.DataFrame:
    """Every sample in a samples directory (or one Parquet file of samples) as a polars
    DataFrame in :data:`SCHEMA`, one row per prediction id, oldest first.

    Safe while a store appends and compacts: the SQLite rows are read first (one snapshot),
    then the Parquet parts are listed. A row compacted away meanwhile is in a part renamed
    into place before the row was deleted, so the parts listed afterwards hold it; a row read
    from both is kept once.
    """
    import polars as pl

    directory = Path(directory)
    if directory.is_file():
        return pl.read_parquet(directory)
    recent = records_table([])
    if (directory / DB_NAME).exists():
        db = sqlite_connect(directory / DB_NAME, read_only=True)
        try:
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'samples'").fetchone():
                recent = uncompacted(db)[0]
        finally:
            db.close()
    tables = [read_part(part) for part in part_files(directory)]
    frame = pl.from_arrow(pa.concat_tables([*tables, recent]))
    assert isinstance(frame, pl.DataFrame)
    return frame.unique(subset="prediction_id", keep="first", maintain_order=True)


def read_part(path: Path) -> pa.Table:
    """One Parquet part in :data:`SCHEMA`; a part written before a column was added gets it
    as nulls."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for name in SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, SCHEMA.field(name).type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def add_missing_columns(db: sqlite3.Connection) -> None:
    """Give a ``samples`` table created before a column of :data:`ADDED_COLUMNS` existed that
    column (``source``; ``label``, ``side``, ``underlying_log_return``), NULL in its rows."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(samples)")}
    for name, kind in ADDED_COLUMNS:
        if name not in columns:
            db.execute(f"ALTER TABLE samples ADD COLUMN {name} {kind}")


_PART_NAME = re.compile(r"part-\d+-\d+\.parquet")
"""A part the store wrote: ``part-<first seq>-<last seq>.parquet``."""


def part_files(directory: Path) -> list[Path]:
    """The compacted Parquet parts of a samples directory, oldest first: only the files named
    as the store names them, so that another file there (an operator's ``part-...-3
    (copy).parquet``) is neither read twice as samples nor taken for a part's range (it made
    opening the store fail, and Feedback answer INTERNAL)."""
    parts = (Path(directory) / PARTS_DIR).glob("part-*.parquet")
    return sorted(part for part in parts if _PART_NAME.fullmatch(part.name))


def compacted_until(directory: Path) -> int:
    """The highest ``seq`` in a Parquet part (0 when there is none)."""
    return max((int(part.stem.split("-")[2]) for part in part_files(directory)), default=0)
