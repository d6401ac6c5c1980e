"""The feedback samples directory: its layout, its record schema, and the one reader of it.

A model server stores the outcomes fed back to it (:mod:`~xylen_server.learning.feedback_store`
writes them) under its learning directory::

    feedback_wal/wal-<seq, 16 digits>.log            the write-ahead log, one active segment
    training_samples/part-<lo seq>-<hi seq>.parquet  compacted records of WAL segments lo..hi

A WAL segment starts with the 8-byte magic ``XYLWAL01``; each record is a frame
``<u32 payload length, little-endian><u32 crc32(payload)><payload: UTF-8 JSON>``.

Parquet columns (:data:`SCHEMA`, one row per prediction id): ``prediction_id`` string,
``model_name`` string, ``model_version`` int64 (null when the prediction was no longer in the
prediction log), ``features`` list<float32> (one list per row, in the model's ``feature_names``
order, so models with different feature sets share one dataset), ``probability_up`` float64
(nullable), ``signal`` int32 (``xylen.v1.Signal`` value, nullable), ``pnl`` float64,
``realized_return`` float64, ``close_time`` and ``received_time`` timestamp[ms, UTC], ``label``
int8 (1 if ``realized_return > 0`` else 0).

:func:`read_samples` is how the server and the retrain job read it, safely while the server
keeps appending and compacting.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import polars as pl

logger = logging.getLogger(__name__)

WAL_DIR = "feedback_wal"
PARTS_DIR = "training_samples"
MAGIC = b"XYLWAL01"
_HEADER = struct.Struct("<II")
MAX_RECORD_BYTES = 1 << 20
"""A frame claiming a longer payload is treated as corrupt."""

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
    ]
)
"""The Parquet schema of the training samples."""


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

    @property
    def label(self) -> int:
        """1 if the trade made money (``realized_return > 0``), else 0."""
        return 1 if self.realized_return > 0 else 0

    def encode(self) -> bytes:
        """The WAL payload: compact JSON; float32 features survive exactly (via float64)."""
        return json.dumps(
            [
                self.prediction_id,
                self.model_name,
                self.model_version,
                self.features.tolist(),
                self.probability_up,
                self.signal,
                self.pnl,
                self.realized_return,
                self.close_time_ms,
                self.received_time_ms,
            ],
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, payload: bytes) -> FeedbackRecord:
        fields = json.loads(payload)
        fields[3] = np.array(fields[3], dtype=np.float32)
        return cls(*fields)


def frame(payload: bytes) -> bytes:
    """One WAL frame: length, CRC32, payload."""
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_segment(path: Path) -> tuple[list[FeedbackRecord], int]:
    """The records of one WAL segment up to the first torn or corrupt frame, and the byte
    offset where the good frames end (the segment's length when all are good)."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):  # crashed while creating the segment: nothing in it
            return [], 0
        raise OSError(f"{path} is not a xylen WAL segment")
    records: list[FeedbackRecord] = []
    offset = len(MAGIC)
    while offset < len(data):
        good = offset + _HEADER.size <= len(data)
        if good:
            length, crc = _HEADER.unpack_from(data, offset)
            end = offset + _HEADER.size + length
            payload = data[offset + _HEADER.size : end]
            good = 0 < length <= MAX_RECORD_BYTES and end <= len(data)
            good = good and zlib.crc32(payload) == crc
        if not good:
            logger.warning(
                "WAL %s: torn or corrupt record at byte %d; %d trailing bytes unread",
                path,
                offset,
                len(data) - offset,
            )
            break
        records.append(FeedbackRecord.decode(payload))
        offset = end
    return records, offset


def records_table(records: Sequence[FeedbackRecord]) -> pa.Table:
    """``records`` as an Arrow table in :data:`SCHEMA`."""
    widths = [len(r.features) for r in records]
    offsets = np.zeros(len(records) + 1, dtype=np.int32)
    np.cumsum(widths, out=offsets[1:])
    flat = (
        np.concatenate([r.features for r in records]).astype(np.float32, copy=False)
        if records
        else np.empty(0, np.float32)
    )

    def column(name: str) -> list[object]:
        return [getattr(r, name) for r in records]

    return pa.Table.from_arrays(
        [
            pa.array(column("prediction_id"), pa.string()),
            pa.array(column("model_name"), pa.string()),
            pa.array(column("model_version"), pa.int64()),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32())),
            pa.array(column("probability_up"), pa.float64()),
            pa.array(column("signal"), pa.int32()),
            pa.array(column("pnl"), pa.float64()),
            pa.array(column("realized_return"), pa.float64()),
            pa.array(column("close_time_ms"), pa.int64()).cast(SCHEMA.field("close_time").type),
            pa.array(column("received_time_ms"), pa.int64()).cast(
                SCHEMA.field("received_time").type
            ),
            pa.array(column("label"), pa.int8()),
        ],
        schema=SCHEMA,
    )


def read_samples(directory: Path) -> pl.DataFrame:
    """Every sample in a samples directory (or one Parquet file of samples) as a polars
    DataFrame in :data:`SCHEMA`, one row per prediction id, oldest first.

    Safe while a store appends and compacts: WAL segments are read first (up to a torn tail),
    then the Parquet parts. A segment compacted away meanwhile has its records in a part
    written before the segment was deleted, so the parts listed afterwards hold them.
    """
    import polars as pl
    import pyarrow.parquet as pq

    directory = Path(directory)
    if directory.is_file():
        return pl.read_parquet(directory)
    records: list[FeedbackRecord] = []
    for segment in sorted((directory / WAL_DIR).glob("wal-*.log")):
        try:
            records.extend(read_segment(segment)[0])
        except OSError:
            continue
    tables = [pq.read_table(part, schema=SCHEMA) for part in part_files(directory)]
    frame = pl.from_arrow(pa.concat_tables([*tables, records_table(records)]))
    assert isinstance(frame, pl.DataFrame)
    return frame.unique(subset="prediction_id", keep="first", maintain_order=True)


def part_files(directory: Path) -> list[Path]:
    """The compacted Parquet parts of a samples directory, oldest first."""
    return sorted((Path(directory) / PARTS_DIR).glob("part-*.parquet"))
