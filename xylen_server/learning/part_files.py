"""The prediction log's part files: their schema, names and listing, and reading them.

On disk (a log's ``directory``, e.g. ``model_server/data/prediction_log/``), one Snappy Parquet
file per flush, written to a temporary name, fsynced and renamed, so a reader never sees a
partial file::

    part-<first time ms, 13 digits>-<sequence, 8 digits>.parquet

Columns (:data:`SCHEMA`): ``prediction_id`` (string), ``time`` (timestamp[ms, UTC], when the
server predicted), ``model_name`` (string), ``model_version`` (int64), ``features``
(list<float32>, in the model's ``feature_names`` order, exactly the values the model ran on),
``probability_up`` (float64), ``signal`` (int32, the ``xylen.v1.Signal`` value: 1 BUY, 2 SELL,
3 HOLD).

Each ended hour's parts are merged into one (:mod:`~xylen_server.learning.part_rollup`). The
merged part names the parts it replaces, with their row counts, in its Parquet metadata
(:data:`REPLACES_KEY`); while a merge's journal (:data:`ROLLUP_FILE`) is there, the merged part
and the parts it replaces may both be on disk. :func:`live_parts` lists the parts without those
a merged part in place replaces. A tool globbing ``*.parquet`` in the instant between a merged
part's rename and the deletes of its parts can see that window's rows twice; one listing parts
and reading them later can find a part gone. :func:`read_once` reads each row once either way
(``PredictionLog(directory, reader=True)``'s ``read`` and ``replay_rows``).

Nothing here imports the rest of the log: the index, the rollup and the log import this.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xylen_server.learning import arrow_columns as columns

logger = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        pa.field("prediction_id", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.int64(), nullable=False),
        pa.field("features", pa.list_(pa.float32()), nullable=False),
        pa.field("probability_up", pa.float64(), nullable=False),
        pa.field("signal", pa.int32(), nullable=False),
    ]
)
"""The Parquet schema of every prediction-log part file."""


@dataclass(frozen=True)
class LoggedPrediction:
    """One row the server predicted on, and what it answered."""

    prediction_id: str
    time_ms: int
    """When the server predicted, UTC milliseconds since the epoch."""
    model_name: str
    model_version: int
    features: np.ndarray
    """float32 feature row, exactly as the model saw it."""
    probability_up: float
    signal: int
    """``xylen.v1.Signal`` value."""


ROW_GROUP_ROWS = 10_000
"""Rows per Parquet row group of a part: the writer encodes one group at a time, so a
50,000-row flush peaks ~7 MiB lower than as one group."""


DICTIONARY_COLUMNS = ["model_name"]
"""The part files' only dictionary-encoded column (one or two names in a whole part). Ids,
features and probabilities are nearly all distinct: a dictionary of them is a hash-table insert
per value for a larger file (10,000 rows of distinct features: 3.2-11.6 us of the flusher's CPU
a row and 173 bytes a row with every column in a dictionary, 0.7 us and 114 bytes without), and
the flusher's CPU is the serving process's."""


ROLLUP_FILE = "_rollup.json"
"""The merge in progress (:meth:`PredictionLog.roll_up`), in the log's directory: the merged
part's name and the names of the parts it replaces. Written and fsynced before the merged part
is renamed into place, removed once those parts are deleted; a crash in between leaves it, and
:func:`live_parts` (so :meth:`PredictionLog.part_files`) leaves out the parts it names while
the merged part is in place, and the next start deletes them."""
REPLACES_KEY = b"xylen.replaces"
"""Key of a merged part's Parquet key-value metadata: JSON ``[[part name, rows], ...]`` of the
parts it replaced, in order (its rows are theirs, in that order)."""


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


def _part_time(name: str) -> int | None:
    """The first time (ms) a part's name carries (None for a name of another shape)."""
    digits = name[5:18]
    return int(digits) if len(digits) == 13 and digits.isdigit() and name[18:19] == "-" else None


def _part_sequence(name: str) -> int:
    try:
        return int(name.removesuffix(".parquet").rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _read_rollup(directory: Path) -> tuple[str, list[str]] | None:
    """The merge in progress: (its merged part, the parts it replaces); None if there is none."""
    try:
        raw = json.loads((directory / ROLLUP_FILE).read_text(encoding="utf-8"))
        return str(raw["part"]), [str(name) for name in raw["replaces"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("prediction log: %s cannot be read; ignored", directory / ROLLUP_FILE)
        return None


def live_parts(directory: Path) -> list[Path]:
    """The part files of a log's directory, oldest first, without those a merged part in place
    replaces (a merge a crash interrupted, or one in progress in another process)."""
    try:
        names = [name for name in os.listdir(directory) if _is_part(name)]
    except FileNotFoundError:
        return []
    # Read after the listing: a listing holding a merged part and its sources was taken while
    # the journal existed (it is written before the rename and removed after the deletes).
    rollup = _read_rollup(directory)
    if rollup is not None and rollup[0] in names:
        replaced = set(rollup[1])
        names = [name for name in names if name not in replaced]
    return [directory / name for name in sorted(names)]


def _part_rows(path: Path) -> tuple[int, int, int] | None:
    """(oldest time, newest time, rows) of a part, from its footer's statistics (its time
    column when they are missing); None for a part that cannot be read or holds no row."""
    try:
        with pq.ParquetFile(path) as file:
            meta = file.metadata
            rows = meta.num_rows
            at = [meta.schema.column(i).path for i in range(meta.num_columns)].index("time")
            lows: list[int] = []
            highs: list[int] = []
            for group in range(meta.num_row_groups):
                stats = meta.row_group(group).column(at).statistics
                if stats is None or not stats.has_min_max:
                    break
                lows.append(int(stats.min_raw))
                highs.append(int(stats.max_raw))
            else:
                if lows:
                    return min(lows), max(highs), rows
            times = columns.to_numpy(file.read(columns=["time"]).column(0))
    except (FileNotFoundError, pa.ArrowInvalid, ValueError):
        return None
    return (int(times.min()), int(times.max()), rows) if len(times) else None


def _string_offsets(chunk: pa.Array) -> np.ndarray:
    """Where each value of a string array starts in its data buffer, and where the last ends
    (``len(chunk) + 1`` int32, read in place from the array's offsets buffer)."""
    return np.frombuffer(chunk.buffers()[1], np.int32, len(chunk) + 1, chunk.offset * 4)


def _find_in_part(path: Path, prediction_id: str) -> LoggedPrediction | None:
    """The row of ``prediction_id`` in one part file (its first, should it hold two), or None:
    a row group at a time (a merged part holds an hour, up to ~700,000 rows), its id column
    compared as bytes (no ``str`` per row), the whole group only when it holds the id."""
    wanted = prediction_id.encode()
    with pq.ParquetFile(path) as part:
        for group in range(part.num_row_groups):
            ids = part.read_row_group(group, columns=["prediction_id"]).column(0)
            hits = _equal_rows(ids.combine_chunks(), wanted)
            if hits.size:
                table = part.read_row_group(group)
                keep = np.zeros(table.num_rows, dtype=bool)
                keep[hits[0]] = True
                return next(_rows(table, keep))
    return None


def _replaced_by(part: pq.ParquetFile) -> list[tuple[str, int]]:
    """The parts a merged part replaced, with their row counts, in order ([] for a part)."""
    metadata = part.schema_arrow.metadata or {}
    raw = metadata.get(REPLACES_KEY)
    if raw is None:
        return []
    try:
        return [(str(name), int(rows)) for name, rows in json.loads(raw)]
    except (ValueError, TypeError):
        return []


def _replaced_rows(part: pq.ParquetFile, done: set[str]) -> np.ndarray:
    """Which rows of a part were read already (a merged part: those of its parts in ``done``);
    marks the parts it replaced as read."""
    read = np.zeros(part.metadata.num_rows, dtype=bool)
    at = 0
    for name, rows in _replaced_by(part):
        if name in done:
            read[at : at + rows] = True
        done.add(name)
        at += rows
    return read


def _equal_rows(chunk: pa.Array, wanted: bytes) -> np.ndarray:
    """The rows of a string array equal to ``wanted`` (numpy over its buffers)."""
    n = len(chunk)
    if n == 0:
        return np.zeros(0, np.int64)
    offsets = _string_offsets(chunk)
    hits = np.flatnonzero(np.diff(offsets) == len(wanted))
    if not hits.size or not wanted:
        return hits
    data = np.frombuffer(chunk.buffers()[2], np.uint8)
    at = offsets[hits].astype(np.int64)[:, None] + np.arange(len(wanted))
    return hits[(data[at] == np.frombuffer(wanted, np.uint8)).all(axis=1)]


def _rows(table: pa.Table, keep: np.ndarray) -> Iterator[LoggedPrediction]:
    """The rows of a part-file table where ``keep`` is true."""
    times = columns.to_numpy(table.column("time"))
    versions = columns.to_numpy(table.column("model_version"))
    offsets, flat = columns.float32_lists_to_numpy(table.column("features"))
    ids = table.column("prediction_id").to_pylist()
    names = table.column("model_name").to_pylist()
    probabilities = columns.to_numpy(table.column("probability_up"))
    signals = columns.to_numpy(table.column("signal"))
    for i in np.flatnonzero(keep):
        yield LoggedPrediction(
            ids[i],
            int(times[i]),
            names[i],
            int(versions[i]),
            flat[offsets[i] : offsets[i + 1]],
            float(probabilities[i]),
            int(signals[i]),
        )


def read_once(listing: Callable[[], list[Path]]) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """The row groups of the parts ``listing`` gives (``PredictionLog.part_files``), in order,
    each with which of its rows are not read yet: each row once while parts are merged
    meanwhile (this process's flusher or another's). A part gone when its turn comes is read
    from the merged part that replaced it, less the rows of its parts already read
    (``xylen.replaces`` gives their row counts), and a merged part listed beside parts it
    replaces skips theirs. A row group at a time: a merged part is big."""
    done: set[str] = set()
    listed = listing()
    for path in listed:
        if path.name in done:
            continue
        try:
            part = pq.ParquetFile(path)
        except FileNotFoundError:
            holder = _merged_holder(path.name, {p.name for p in listed}, listing)
            if holder is None:
                continue
            try:
                part = pq.ParquetFile(holder)
            except FileNotFoundError:
                continue
            path = holder
        with part:
            read = _replaced_rows(part, done)
            done.add(path.name)
            at = 0
            for group in range(part.num_row_groups):
                table = part.read_row_group(group)
                yield table, ~read[at : at + table.num_rows]
                at += table.num_rows


def _merged_holder(name: str, listed: set[str], listing: Callable[[], list[Path]]) -> Path | None:
    """The merged part, not in ``listed``, that replaced the part ``name`` (None: none)."""
    for path in listing():
        if path.name in listed:
            continue
        try:
            with pq.ParquetFile(path) as part:
                replaced = _replaced_by(part)
        except (FileNotFoundError, pa.ArrowInvalid):
            continue
        if any(source == name for source, _ in replaced):
            return path
    return None
