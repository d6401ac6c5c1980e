"""What the server predicted on, keyed by prediction id: in memory for the Feedback join, and
as Parquet so any past signal can be replayed bit-exactly against the model version that made it.

The hot path is :meth:`PredictionLog.record`, called once per Predict batch: it appends the batch
to an in-memory buffer and indexes its ids, nothing more (no I/O, no fsync). A background
flusher thread writes the buffer as a Parquet part file every ``flush_rows`` rows or
``flush_interval_seconds``, whichever comes first. A crash loses at most the unflushed buffer;
the log is a record of what was said, not an acknowledgment.

On disk (``directory``, e.g. ``model_server/data/prediction_log/``), one Snappy Parquet file per
flush, written to a temporary name, fsynced and renamed, so a reader never sees a partial file::

    part-<first time ms, 13 digits>-<sequence, 8 digits>.parquet

Beside the parts, ``_parts.index`` (JSON lines, appended after each part is in place) says
which ids each part can hold without opening it: its newest time, and for the server's own ids
(``<12 hex>-<hex counter>``) the counter range of each prefix, for any other id a 64-bit
BLAKE2b of each (or ``null``: too many to list, the part is read to be indexed). A lookup after
a restart reads this file and opens only the parts that can hold the id; a part it does not
list (written before the index, or the line lost in a crash) is read once and added to it.

The parts stay few: a minute after a window of ``rollup_seconds`` has ended (an hour by
default, aligned to the epoch, by the log's clock, :mod:`xylen_server.clock`), the flusher merges
the parts whose rows all lie in it into one part, named as the first of them with a new
sequence, holding their rows in the order the parts gave them (:meth:`PredictionLog.roll_up`):
~24 parts a day plus the current hour's, not one a flush (~17,000 a day). One window a flush,
chosen from the parts the log wrote or found at start (no listing), streamed a row group at a
time. The merged part goes to a temporary name (``_rollup-<name>.tmp``) and is fsynced;
``_rollup.json`` (the merged part and the parts it replaces, also in the merged part's Parquet
metadata under ``xylen.replaces``) is made durable; then the part is renamed into place, the
directory fsynced, the replaced parts deleted and ``_rollup.json`` removed. A crash before the
rename leaves the parts as they were; one after it leaves ``_rollup.json``, and
:func:`live_parts` (so :meth:`PredictionLog.part_files`, replay) leaves out the parts it names
until the next start deletes them: every row reads once. A part with rows of two windows stays
as it is. A tool globbing ``*.parquet`` in the instant between a rename and the deletes can see
that window's rows twice.

Columns: ``prediction_id`` (string), ``time`` (timestamp[ms, UTC], when the server predicted),
``model_name`` (string), ``model_version`` (int64), ``features`` (list<float32>, in the model's
``feature_names`` order, exactly the values the model ran on), ``probability_up`` (float64),
``signal`` (int32, the ``xylen.v1.Signal`` value: 1 BUY, 2 SELL, 3 HOLD). Any tool reads it::

    polars.read_parquet("model_server/data/prediction_log/*.parquet")
    pyarrow.parquet.read_table("model_server/data/prediction_log")
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.metadata import fsync_dir, fsync_path
from xylen_server import clock
from xylen_server.learning import arrow_columns as columns
from xylen_server.settings import Settings
from xylen_server.trouble import Trouble, describe

if TYPE_CHECKING:
    import polars as pl

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


ID_BYTES = 32
"""Bytes of a prediction id held inline per row (the server's own ids take 29 at most); a longer
id is held whole beside the ring (rare: only ids the caller made)."""
_VECTOR_ROWS = 8
"""Batches of more rows than this are indexed with numpy, one probe step for all rows."""
ROW_GROUP_ROWS = 10_000
"""Rows per Parquet row group of a part: the writer encodes one group at a time, so a
50,000-row flush peaks ~7 MiB lower than as one group."""


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


@dataclass(frozen=True)
class _PartIndex:
    """The sorted hashes of one part's prediction ids and its newest prediction time."""

    hashes: np.ndarray
    newest_ms: int

    def holds(self, key: int) -> bool:
        at = int(np.searchsorted(self.hashes, key))
        return at < len(self.hashes) and int(self.hashes[at]) == key


SEGMENT_PARTS = 128
"""Parts whose id hashes :meth:`PredictionLog.find_recent` merges into one sorted segment: a
lookup searches each segment once instead of each part (a day's parts at one every 5 s are
~17,000: 135 segments)."""


@dataclass(frozen=True)
class _Segment:
    """The id hashes of several parts, merged and sorted, each with the part it came from."""

    hashes: np.ndarray
    owners: np.ndarray
    """Index into ``paths`` of each hash's part."""
    paths: list[Path]
    newest: list[int]
    """Each part's newest prediction time (ms)."""
    newest_ms: int

    @classmethod
    def merge(cls, parts: dict[Path, _PartIndex]) -> _Segment:
        paths = list(parts)
        hashes = np.concatenate([part.hashes for part in parts.values()])
        owners = np.repeat(
            np.arange(len(paths), dtype=np.int32), [len(part.hashes) for part in parts.values()]
        )
        order = np.argsort(hashes, kind="stable")
        newest = [part.newest_ms for part in parts.values()]
        return cls(hashes[order], owners[order], paths, newest, max(newest))

    def holders(self, key: int, oldest_ms: int) -> list[Path]:
        """The parts within the retention that hold ``key``, newest first."""
        lo = int(np.searchsorted(self.hashes, key, "left"))
        hi = int(np.searchsorted(self.hashes, key, "right"))
        found = sorted({int(i) for i in self.owners[lo:hi]}, reverse=True)
        return [self.paths[i] for i in found if self.newest[i] >= oldest_ms]

    def without(self, gone: set[Path]) -> _Segment | None:
        """This segment without the parts ``gone`` (None: nothing left)."""
        keep = np.array([path not in gone for path in self.paths], dtype=bool)
        if keep.all():
            return self
        if not keep.any():
            return None
        renumber = (np.cumsum(keep) - 1).astype(np.int32)
        rows = keep[self.owners]
        newest = [ms for ms, kept in zip(self.newest, keep.tolist(), strict=True) if kept]
        return _Segment(
            self.hashes[rows],
            renumber[self.owners[rows]],
            [path for path, kept in zip(self.paths, keep.tolist(), strict=True) if kept],
            newest,
            max(newest),
        )


INDEX_FILE = "_parts.index"
"""The parts' summaries (:class:`_PartSummary`), one JSON line per part, in the log's
directory."""
SERVER_ID = re.compile(r"([0-9a-f]{12})-(0|[1-9a-f][0-9a-f]{0,14})")
"""The server's own prediction ids (``Predictor``: a 12-hex-digit prefix per process and a hex
counter): indexed by counter range, the others one by one."""
_ID_WIDTH = 28
"""Longest id of the server's shape (12 + 1 + 15)."""
MAX_LISTED_IDS = 1024
"""Most ids of another shape a part's summary lists; past it the summary says ``null`` (any)."""
SUMMARY_ENTRIES = 4096
"""Summary entries (a prefix's range, a listed id) a log keeps before it first drops those of
parts past the retention; then twice what it kept."""
MAX_PREFIXES = 16
"""Most prefixes a part's summary keeps a range for; past it the part is indexed by reading."""


def _ends_torn(path: Path) -> bool:
    """True when the file ``path`` ends inside a line (a crash cut its last append short)."""
    try:
        with open(path, "rb") as lines:
            lines.seek(0, os.SEEK_END)
            if lines.tell() == 0:
                return False
            lines.seek(-1, os.SEEK_END)
            return lines.read(1) != b"\n"
    except OSError:
        return False


def stable_id_hash(prediction_id: str) -> int:
    """A 64-bit hash of an id that is the same in every process (``hash()`` is not)."""
    digest = hashlib.blake2b(prediction_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


_COUNTER_DIGITS = _ID_WIDTH - 13
_HEX = np.full(256, -1, dtype=np.int8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)


@dataclass(frozen=True)
class _PartSummary:
    """Which ids one part can hold, known without opening it."""

    name: str
    newest_ms: int
    ranges: dict[str, tuple[int, int]]
    """Prefix -> (lowest, highest) counter of the part's ids of the server's shape."""
    others: frozenset[int] | None
    """:func:`stable_id_hash` of every other id; None: too many to list."""

    @property
    def usable(self) -> bool:
        """True when the summary alone says which ids the part can hold."""
        return self.others is not None

    def line(self) -> str:
        others = None if self.others is None else sorted(self.others)
        ranges = {prefix: list(bounds) for prefix, bounds in self.ranges.items()}
        body = {"part": self.name, "newest": self.newest_ms, "ranges": ranges, "others": others}
        return json.dumps(body, separators=(",", ":")) + "\n"

    @classmethod
    def parse(cls, line: str) -> _PartSummary | None:
        """The summary a line holds; None for a torn or foreign line."""
        try:
            raw = json.loads(line)
            others = raw["others"]
            return cls(
                str(raw["part"]),
                int(raw["newest"]),
                {str(p): (int(lo), int(hi)) for p, (lo, hi) in raw["ranges"].items()},
                None if others is None else frozenset(int(h) for h in others),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    @classmethod
    def of(
        cls,
        name: str,
        ids: pa.ChunkedArray | pa.Array | list[tuple[pa.Array, np.ndarray | None]],
        newest_ms: int,
    ) -> _PartSummary:
        """The summary of a part whose id column is ``ids`` (or its batches' ids, each with the
        ring's fixed-width copy when it has one): numpy, no ``str`` per id of the server's
        shape (50,000 ids: ~7 ms of CPU from the ring's copy, ~15 ms from a column)."""
        if isinstance(ids, list):
            chunks = ids
        else:
            arrays = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
            chunks = [(array, None) for array in arrays]
        ranges: dict[str, tuple[int, int]] = {}
        listed: set[int] | None = set()
        for chunk, fixed in chunks:
            if len(chunk) == 0:
                continue
            prefixes, counters, ours = _server_ids(chunk, fixed)
            for prefix in np.unique(prefixes[ours]).tolist():
                values = counters[ours & (prefixes == prefix)]
                key = prefix.decode()
                lo, hi = int(values.min()), int(values.max())
                if key in ranges:
                    lo, hi = min(lo, ranges[key][0]), max(hi, ranges[key][1])
                ranges[key] = (lo, hi)
            if listed is not None and not ours.all():
                odd = [chunk[i].as_py() for i in np.flatnonzero(~ours).tolist()]
                listed.update(stable_id_hash(i) for i in odd)
                if len(listed) > MAX_LISTED_IDS:
                    listed = None
        if len(ranges) > MAX_PREFIXES:
            listed = None
        return cls(name, newest_ms, ranges, None if listed is None else frozenset(listed))

    @classmethod
    def merged(cls, name: str, newest_ms: int, parts: Sequence[_PartSummary]) -> _PartSummary:
        """The summary of a part holding the rows of ``parts`` (its pieces' summaries)."""
        ranges: dict[str, tuple[int, int]] = {}
        listed: set[int] | None = set()
        for part in parts:
            for prefix, (lo, hi) in part.ranges.items():
                if prefix in ranges:
                    lo, hi = min(lo, ranges[prefix][0]), max(hi, ranges[prefix][1])
                ranges[prefix] = (lo, hi)
            if listed is not None:
                listed = None if part.others is None else listed | part.others
                if listed is not None and len(listed) > MAX_LISTED_IDS:
                    listed = None
        if len(ranges) > MAX_PREFIXES:
            listed = None
        return cls(name, newest_ms, ranges, None if listed is None else frozenset(listed))


def _string_offsets(chunk: pa.Array) -> np.ndarray:
    """Where each value of a string array starts in its data buffer, and where the last ends
    (``len(chunk) + 1`` int32, read in place from the array's offsets buffer)."""
    return np.frombuffer(chunk.buffers()[1], np.int32, len(chunk) + 1, chunk.offset * 4)


def _server_ids(
    chunk: pa.Array, fixed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each id of a string array: its 12-byte prefix, its counter and whether it has the
    server's shape (:data:`SERVER_ID`); prefix and counter mean nothing where it has not.

    Numpy over a zero-padded byte matrix of the ids: ``fixed`` (the ring's ``S32`` ids, the
    same values; no copy) when given, else gathered from the array's buffers."""
    n = len(chunk)
    offsets = _string_offsets(chunk) if n else np.zeros(1, np.int32)
    lengths = np.diff(offsets).astype(np.int64)
    if fixed is not None and fixed.dtype.itemsize >= _ID_WIDTH:
        matrix = np.ascontiguousarray(fixed).view(np.uint8).reshape(n, fixed.dtype.itemsize)
    else:
        matrix = np.zeros((n, _ID_WIDTH), np.uint8)
        raw = chunk.buffers()[2] if n else None
        if raw is not None:
            data = np.frombuffer(raw, np.uint8)
            starts = offsets[:-1]
            width = np.arange(_ID_WIDTH)
            inside = width < lengths[:, None]
            at = np.minimum(starts[:, None].astype(np.int64) + width, len(data) - 1)
            np.copyto(matrix, data[at], where=inside)
    digits = _HEX[matrix[:, 13:_ID_WIDTH]]
    counted = lengths - 13
    ours = (lengths >= 14) & (lengths <= _ID_WIDTH) & (matrix[:, 12] == ord("-"))
    ours &= (_HEX[matrix[:, :12]] >= 0).all(axis=1)
    ours &= (digits >= 0).sum(axis=1, dtype=np.int64) == counted  # all hex, nothing after
    ours &= (matrix[:, 13] != ord("0")) | (counted == 1)  # no leading zero
    value = np.zeros(n, np.int64)
    padded = np.maximum(digits, 0)
    for column in range(_COUNTER_DIGITS):  # left-aligned, then shifted into place
        value <<= 4
        value |= padded[:, column]
    counters = value >> (4 * (_COUNTER_DIGITS - np.clip(counted, 0, _COUNTER_DIGITS)))
    prefixes = np.ascontiguousarray(matrix[:, :12]).view("S12").ravel()
    return prefixes, counters, ours


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
INDEX_REWRITE_LINES = 4096
"""Lines of merged-away parts ``_parts.index`` holds before it is first rewritten without
them; then once they outnumber the lines kept (each line is read a few times at most)."""
ROLLUP_GRACE_MS = 60_000
"""How long after a window ends (by the log's clock) its parts are merged: a flush every few
seconds has written its last rows by then."""
REPLACES_KEY = b"xylen.replaces"
"""Key of a merged part's Parquet key-value metadata: JSON ``[[part name, rows], ...]`` of the
parts it replaced, in order (its rows are theirs, in that order)."""
_rollup_hook: Callable[[str], None] | None = None
"""Tests only: called with ``"journal"`` (the merged part written, not yet in place) and
``"renamed"`` (in place, the parts it replaces not yet deleted), where a crash test stops."""


def _line_part(line: str) -> str | None:
    """The part a ``_parts.index`` line is of (None: a torn or foreign line)."""
    try:
        name = json.loads(line)["part"]
    except (ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


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


_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)


def _now_ms() -> int:
    return clock.now_ms()


class PredictionLog:
    """Bounded in-memory index of recent predictions plus a Parquet history of all of them.

    In memory the rows live in preallocated column arrays used as a ring (float32 features,
    fixed-width ids, times, versions, outputs) with an open-addressing index of id hashes: no
    Python object per row, :func:`row_bytes` each (183 bytes for 25 features; a dict of
    per-batch objects took ~1.3 KiB), and at most ``max_rows`` rows or ``max_bytes`` bytes,
    whichever is fewer rows. The rows not yet written out are read from the same ring; if the
    flusher falls so far behind that the ring would overwrite them, they are first copied into
    a pending Parquet table (``spilled_rows``), so the history never misses a row.

    ``directory=None`` keeps the log in memory only (nothing persisted). Thread-safe: ``record``
    and ``get`` may be called from any thread or the event loop.
    """

    def __init__(
        self,
        directory: Path | str | None,
        *,
        max_rows: int = Settings.prediction_log_max_rows,
        max_age_seconds: float = Settings.prediction_log_max_age_seconds,
        flush_rows: int = Settings.prediction_log_flush_rows,
        flush_interval_seconds: float = Settings.prediction_log_flush_interval_seconds,
        fsync: bool = True,
        max_bytes: int = Settings.prediction_log_max_bytes,
        count_failure: Callable[[str], None] | None = None,
        rollup_seconds: float = Settings.prediction_log_rollup_seconds,
        reader: bool = False,
    ) -> None:
        """
        Args:
            directory: where part files go (created if missing); None persists nothing.
            max_rows: most rows kept in memory for :meth:`get` (oldest dropped first).
            max_age_seconds: rows older than this are dropped from memory.
            flush_rows: the flusher writes as soon as this many rows are buffered.
            flush_interval_seconds: ... and at least this often while rows are buffered.
            fsync: fsync each part file before its rename (on the flusher thread, never on
                the Predict path).
            max_bytes: most bytes the in-memory rows and their index take (:func:`row_bytes`
                a row); the ring holds ``min(max_rows, max_bytes // row_bytes)`` rows.
            count_failure: called with ``"prediction_log"`` at every failed write of the
                flusher (the server's ``xylen_storage_failures_total{part}``).
            rollup_seconds: once a window this long (aligned to the epoch, by the log's
                clock) has ended, the flusher merges its parts into one (:meth:`roll_up`;
                only a log that has written a part does); 0: never.
            reader: open another process's log to read it (``xylen-server replay``, tools):
                nothing in the directory is changed (its writer's temporary files, an
                interrupted merge's journal and parts are left to the writer), no flusher
                runs, and rows recorded in it stay in memory (as with no ``directory``).
        """
        if (
            max_rows < 1
            or flush_rows < 1
            or flush_interval_seconds <= 0
            or max_age_seconds <= 0
            or max_bytes < 1
            or rollup_seconds < 0
        ):
            raise ValueError(
                "max_rows, max_bytes, flush_rows, flush interval and max age must be positive"
            )
        self.directory = Path(directory) if directory is not None else None
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_age_ms = int(max_age_seconds * 1000)
        self.flush_rows = flush_rows
        self.flush_interval = flush_interval_seconds
        self._fsync = fsync
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ring: _Ring | None = None  # allocated at the first row (its width)
        self._names: dict[str, int] = {}
        self._name_list: list[str] = []
        self._next = 1  # seq of the next row (0 marks an empty index entry)
        self._start = 1  # oldest seq still answered from memory
        self._unflushed = 1  # oldest seq not yet handed to the flusher
        self._spilled: list[_Rows] = []
        self.spilled_rows = 0
        """Rows copied out of the ring before the flusher took them (it fell behind)."""
        self.dropped_rows = 0
        """Rows that never reached a part: while part files could not be written (a full
        disk), more rows waited than the ring holds, and the oldest were let go."""
        self._dropping_since: int | None = None  # dropped_rows when the drops were told
        self._flush_lock = threading.Lock()  # one writer of part files at a time
        self._disk_lock = threading.Lock()
        self._disk_index: dict[Path, _PartIndex] = {}
        """The parts within the retention not merged into a segment yet, in name order."""
        self._segments: list[_Segment] = []
        """The parts merged, :data:`SEGMENT_PARTS` a segment, oldest first."""
        self._disk_seen: set[str] = set()
        """Names of the parts indexed so far, or found wholly older than the retention."""
        self._summaries: dict[str, _PartSummary] = {}
        """The parts' summaries known without opening them (``_parts.index``, and the parts
        this process wrote), by name; read from the file at the first lookup."""
        self._summaries_read = False
        self._index_lock = threading.Lock()  # appends to parts.index
        self._index_torn: bool | None = None  # the last line may be partial (None: not known)
        self.index_trouble = Trouble("prediction_log", "the parts index", logger, None)
        """Failed appends to ``_parts.index``: logged when they begin and end."""
        self._ranged: dict[str, list[tuple[int, int, int, Path]]] = {}
        """Prefix -> (lowest, highest counter, newest ms, part) of the summarised parts."""
        self._ranged_arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        """:attr:`_ranged` as arrays (lowest, highest, newest), made at the next lookup."""
        self._listed: dict[int, list[tuple[int, Path]]] = {}
        """:func:`stable_id_hash` of an id of another shape -> (newest ms, part)."""
        self._summarised = 0  # entries in _ranged and _listed
        self._prune_at = SUMMARY_ENTRIES  # ... past which those past the retention are dropped
        self._rollup_ms = int(rollup_seconds * 1000)
        self._windows: dict[int, list[str]] = {}
        """Window start (ms) -> the parts whose name's time lies in it, not merged yet (the
        parts found at start and those written since). Flusher only (``_flush_lock``)."""
        self._bounds: dict[str, tuple[int, int, int]] = {}
        """Part -> (oldest time, newest time, rows) of the parts this log wrote (read from
        the footer for the others when their window is merged)."""
        self._wrote = False  # a log that writes parts is the directory's writer: it merges
        self._index_stale = 0  # lines of _parts.index whose part was merged away
        self._index_kept = 0  # lines kept at its last rewrite
        self.rollup_trouble = Trouble("prediction_log", "the rollup", logger, None)
        """Failed merges (:meth:`roll_up`): logged when they begin and end."""
        self._closed = False
        self.trouble = Trouble("prediction_log", "the flush", logger, count_failure)
        """The flusher's failed writes (a full disk): counted, logged when they begin and end."""
        self._thread: threading.Thread | None = None
        self.reader = reader
        if self.directory is not None and not reader:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob("*.tmp"):  # this log is the directory's writer
                stale.unlink()
            last = self._recover()
            for path in self.part_files():
                last = max(last, _part_sequence(path.name))
                self._track(path.name, None)
            self._sequence = itertools.count(last + 1)
            self._thread = threading.Thread(
                target=self._flusher, name="prediction-log-flusher", daemon=True
            )
            self._thread.start()

    def capacity_for(self, n_features: int) -> int:
        """Rows the ring holds for rows of ``n_features``."""
        return max(1, min(self.max_rows, self.max_bytes // row_bytes(n_features)))

    def memory_bytes(self) -> int:
        """Bytes the in-memory rows take now (the ring's arrays and index; 0 before a row)."""
        ring = self._ring
        return 0 if ring is None else ring.nbytes()

    # -- hot path ---------------------------------------------------------------------------

    def record(
        self,
        prediction_ids: Sequence[str],
        features: np.ndarray | list[float],
        probabilities: np.ndarray | Sequence[float],
        signals: np.ndarray | Sequence[int],
        model_name: str,
        model_version: int,
        time_ms: int | None = None,
    ) -> None:
        """Remember one Predict batch: its rows are copied into the ring (no I/O).

        ``features`` is the (rows, width) float32 matrix the model ran on (or anything
        ``np.asarray`` makes one of), or, for one row, a list of its values as Python floats
        (the ring rounds them to float32 as it stores them): a row answered alone is stored
        with no array built for it."""
        rows = len(prediction_ids)
        if rows == 0:
            return
        now = _now_ms() if time_ms is None else time_ms
        # One row's values as a list of floats (a list of rows takes the conversion below).
        one_list = (
            features.__class__ is list and rows == 1 and features and features[0].__class__ is float
        )
        if one_list:
            width = len(features)
        else:
            # What the predictor hands over is already (rows, width) float32 and float64: no
            # view or conversion is built for it.
            if not (
                features.__class__ is np.ndarray
                and features.dtype is _FLOAT32
                and features.ndim == 2
                and len(features) == rows
            ):
                features = np.asarray(features, dtype=np.float32).reshape(rows, -1)
            width = features.shape[1]
            if not (probabilities.__class__ is np.ndarray and probabilities.dtype is _FLOAT64):
                probabilities = np.asarray(probabilities, dtype=np.float64)
        matrix = features
        if rows > 1:  # one row's signal goes in as it is (no array built for it)
            signals = np.asarray(signals, dtype=np.int8)
        with self._lock:
            ring = self._ring
            if ring is None or ring.width != width:
                self._spill_pending()
                ring = self._ring = _Ring(self.capacity_for(width), width)
                self._start = self._unflushed = self._next
            name = self._names.get(model_name)
            if name is None:
                name = self._names[model_name] = len(self._name_list)
                self._name_list.append(model_name)
            capacity = ring.capacity
            if self._next + rows - self._unflushed > capacity:
                self._spill_pending()
            skip = max(0, rows - capacity)  # a batch bigger than the ring: only its tail stays
            if skip:
                self._spilled.append(
                    _Rows(
                        columns.strings(prediction_ids[:skip]),
                        np.full(skip, now, dtype=np.int64),
                        columns.strings([model_name] * skip),
                        np.full(skip, model_version, dtype=np.int64),
                        np.array(matrix[:skip], dtype=np.float32),  # copies
                        np.array(probabilities[:skip], dtype=np.float64),
                        np.array(signals[:skip], dtype=np.int8),
                    )
                )
                self.spilled_rows += skip
                self._next += skip
                self._unflushed = self._next
            first = self._next
            kept = rows - skip
            slot = first % capacity
            end = slot + kept
            where: int | slice | np.ndarray
            if kept == 1:
                where = slot
            elif end <= capacity:
                where = slice(slot, end)
            else:
                where = ring.slots(first, first + kept)
            ids = prediction_ids[skip:] if skip else prediction_ids
            if kept == 1:
                ring.features[slot] = matrix if one_list else matrix[-1]
                ring.probabilities[slot] = probabilities[-1]
                ring.signals[slot] = signals[-1]
            else:
                ring.features[where] = matrix[skip:]
                ring.probabilities[where] = probabilities[skip:]
                ring.signals[where] = signals[skip:]
            ring.times[where] = now
            ring.versions[where] = model_version
            ring.names[where] = name
            table, mask, hashes, inline, long_ids = (
                ring.table, ring.mask, ring.hashes, ring.ids, ring.long_ids
            )  # fmt: skip
            start = max(self._start, first + kept - capacity)
            if kept > _VECTOR_ROWS:
                seq = self._index_batch(ring, ids, first, start)
            else:
                seq = first
                for prediction_id in ids:
                    at = seq % capacity
                    key = hash(prediction_id)
                    hashes[at] = key
                    encoded = prediction_id.encode()
                    if len(encoded) > ID_BYTES or encoded.endswith(b"\0"):
                        long_ids[at] = prediction_id
                        inline[at] = b""
                    else:
                        inline[at] = encoded
                        if long_ids:
                            long_ids.pop(at, None)
                    position = key & mask
                    # At most half the table is live (it is twice the ring), so a free entry
                    # is always near: probing never gives up on one and clobbers a live row.
                    probes = 0
                    while start <= int(table[position]) - 1 < seq:  # live: probe on
                        position = (position + 1) & mask
                        probes += 1
                    table[position] = seq + 1
                    if probes > ring.longest_probe:
                        ring.longest_probe = probes
                    seq += 1
            self._next = seq
            self._start = start
            if ring.times[start % capacity] < now - self.max_age_ms:  # _evict's own first test
                self._evict(now)
            if self._thread is not None:
                pending = seq - self._unflushed
                if self._spilled:
                    pending += self.spilled_pending
                if pending >= self.flush_rows:
                    self._wake.notify()
            else:
                self._unflushed = self._next  # memory only: nothing to write out
                self._spilled.clear()

    @staticmethod
    def _index_batch(ring: _Ring, ids: Sequence[str], first: int, start: int) -> int:
        """:meth:`record`'s id columns and index for a big batch, vectorised: the same probing
        as one row at a time, one probe step for all rows at once. Returns the next seq."""
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

    @property
    def spilled_pending(self) -> int:
        return sum(len(rows) for rows in self._spilled) if self._spilled else 0

    def _spill_pending(self) -> None:
        """Copy the rows not yet written out of the ring into a pending table (the ring is
        about to overwrite them or to be replaced); caller holds the lock."""
        if self._thread is not None and self._ring is not None and self._next > self._unflushed:
            rows = self._copy(self._unflushed, self._next)
            self._spilled.append(rows)
            self.spilled_rows += len(rows)
        self._unflushed = self._next

    def _copy(self, first: int, stop: int) -> _Rows:
        """Rows ``[first, stop)`` of the ring, copied (caller holds the lock)."""
        ring = self._ring
        assert ring is not None
        slots = ring.slots(first, stop)
        inline = ring.ids[slots]
        long_ids = ring.long_ids
        if long_ids and np.isin(slots, np.fromiter(long_ids, np.int64, len(long_ids))).any():
            ids = columns.strings(
                [
                    long_ids[int(slot)] if int(slot) in long_ids else raw.decode()
                    for slot, raw in zip(slots, inline, strict=True)
                ]
            )
            fixed = None
        else:  # the common case: every id inline, copied without a str per row
            ids = columns.strings_from_fixed(inline)
            fixed = inline
        names = np.array([name.encode() for name in self._name_list], dtype=bytes)
        return _Rows(
            ids,
            ring.times[slots],
            columns.strings_from_fixed(names[ring.names[slots]]),
            ring.versions[slots],
            ring.features[slots],
            ring.probabilities[slots],
            ring.signals[slots],
            fixed,
        )

    def _evict(self, now_ms: int) -> None:
        """Stop answering rows older than ``max_age``; caller holds the lock."""
        ring = self._ring
        if ring is None:
            return
        oldest_allowed = now_ms - self.max_age_ms
        times, capacity = ring.times, ring.capacity
        while self._start < self._next and times[self._start % capacity] < oldest_allowed:
            self._start += 1

    # -- lookups ----------------------------------------------------------------------------

    def get(self, prediction_id: str) -> LoggedPrediction | None:
        """The logged row for ``prediction_id`` if it is still held in memory, else None."""
        key = hash(prediction_id)
        with self._lock:
            ring = self._ring
            if ring is None:
                return None
            capacity, table, mask = ring.capacity, ring.table, ring.mask
            position = key & mask
            # A held row is at most longest_probe entries past its home: no further look
            # (an unknown id would otherwise read on to an empty entry, which once the table
            # has been reused all over is most of the table, under the lock Predict takes).
            for _ in range(ring.longest_probe + 1):
                entry = int(table[position]) - 1
                if entry < 0:
                    return None
                if self._start <= entry < self._next:
                    at = entry % capacity
                    if int(ring.hashes[at]) == key and self._id_at(ring, at) == prediction_id:
                        if ring.times[at] < _now_ms() - self.max_age_ms:
                            return None
                        return LoggedPrediction(
                            prediction_id,
                            int(ring.times[at]),
                            self._name_list[int(ring.names[at])],
                            int(ring.versions[at]),
                            ring.features[at].copy(),
                            float(ring.probabilities[at]),
                            int(ring.signals[at]),
                        )
                position = (position + 1) & mask
        return None

    @staticmethod
    def _id_at(ring: _Ring, at: int) -> str:
        whole = ring.long_ids.get(at) if ring.long_ids else None
        return whole if whole is not None else bytes(ring.ids[at]).decode()

    def __len__(self) -> int:
        """Rows held in memory."""
        return self._next - self._start

    def part_files(self) -> list[Path]:
        """Persisted part files, oldest first (:func:`live_parts`: not those a merged part
        in place replaces)."""
        if self.directory is None:
            return []
        return live_parts(self.directory)

    def read(self) -> pl.DataFrame:
        """Every persisted row as a polars DataFrame (call :meth:`flush` first to include the
        buffer)."""
        import polars as pl

        parts = self.part_files()
        if not parts:
            return pl.from_arrow(SCHEMA.empty_table())  # type: ignore[return-value]
        return pl.read_parquet([str(path) for path in parts])

    def find(self, prediction_id: str) -> LoggedPrediction | None:
        """The persisted row of ``prediction_id`` (newest part first), or None."""
        for attempt in range(2):
            try:
                for path in reversed(self.part_files()):
                    found = _find_in_part(path, prediction_id)
                    if found is not None:
                        return found
                return None
            except FileNotFoundError:  # merged away meanwhile (another process's rollup)
                if attempt:
                    raise
        return None

    def find_recent(self, prediction_id: str) -> LoggedPrediction | None:
        """The row of ``prediction_id`` if it was predicted within ``max_age_seconds``: from
        memory, else from the part files (what the Feedback join falls back on after a
        restart, or once memory let the row go). Rows still buffered when a process was killed
        (SIGKILL) never reached a part.

        Blocking I/O: call it off the event loop. Which parts can hold the id is known from
        their summaries (``_parts.index``, read once; the parts this process wrote): a
        lookup opens only those, and for the server's own ids that is the one or two parts
        whose counter range holds the id's. A part without a usable summary has its id and
        time columns read once into an index of id hashes (12 bytes a row, in this process
        only), so an unknown id costs no scan of the log either way."""
        found = self.get(prediction_id)
        if found is not None or self.directory is None:
            return found
        oldest = _now_ms() - self.max_age_ms
        key = hash(prediction_id)
        for _ in range(2):  # a part merged away meanwhile: once more, knowing the merged part
            with self._disk_lock:
                self._index_parts(oldest)
                candidates = self._summarised_holders(prediction_id, oldest)
                candidates += [
                    path for path, part in reversed(self._disk_index.items()) if part.holds(key)
                ]
                for segment in reversed(self._segments):
                    candidates += segment.holders(key, oldest)
            gone = False
            for path in candidates:
                try:
                    row = _find_in_part(path, prediction_id)
                except FileNotFoundError:
                    gone = True
                    continue
                if row is not None:
                    return row if row.time_ms >= oldest else None
            if not gone:
                return None
        return None

    def _summarised_holders(self, prediction_id: str, oldest_ms: int) -> list[Path]:
        """The summarised parts within the retention that can hold ``prediction_id``, newest
        first. Caller holds ``_disk_lock``."""
        shaped = SERVER_ID.fullmatch(prediction_id)
        if shaped is None:
            held = self._listed.get(stable_id_hash(prediction_id), [])
            return [path for newest, path in sorted(held, reverse=True) if newest >= oldest_ms]
        prefix, counter = shaped.group(1), int(shaped.group(2), 16)
        entries = self._ranged.get(prefix, [])
        if not entries:
            return []
        arrays = self._ranged_arrays.get(prefix)
        if arrays is None:
            table = np.array([entry[:3] for entry in entries], np.int64).reshape(-1, 3)
            arrays = (table[:, 0], table[:, 1], table[:, 2])
            self._ranged_arrays[prefix] = arrays
        lows, highs, newest = arrays
        hits = np.flatnonzero((lows <= counter) & (highs >= counter) & (newest >= oldest_ms))
        return [entries[i][3] for i in hits[::-1].tolist()]

    def _summarise(self, path: Path, summary: _PartSummary) -> None:
        """Make a usable summary's part findable. Caller holds ``_disk_lock``."""
        for prefix, (lo, hi) in summary.ranges.items():
            self._ranged.setdefault(prefix, []).append((lo, hi, summary.newest_ms, path))
            self._ranged_arrays.pop(prefix, None)
        for key in summary.others or ():
            self._listed.setdefault(key, []).append((summary.newest_ms, path))
        self._summarised += len(summary.ranges) + len(summary.others or ())

    def _forget_summaries(self, oldest_ms: int) -> None:
        """Drop what is known of the parts wholly older than the retention, once the entries
        have doubled since the last time (a server running for weeks writes ~17,000 parts a
        day). Their names stay seen, so they are never read. Caller holds ``_disk_lock``."""
        if self._summarised < self._prune_at:
            return
        self._keep_summarised(lambda newest, _: newest >= oldest_ms)
        seen = self._disk_seen
        for name in [n for n, s in list(self._summaries.items()) if s.newest_ms < oldest_ms]:
            if name in seen:  # in place: the flusher adds the parts it writes meanwhile
                self._summaries.pop(name, None)
        self._prune_at = max(SUMMARY_ENTRIES, 2 * self._summarised)

    def _keep_summarised(self, keep: Callable[[int, Path], bool]) -> None:
        """Keep only the summarised entries (:attr:`_ranged`, :attr:`_listed`) of the parts
        for which ``keep(newest ms, path)`` holds, and recount them. Caller holds
        ``_disk_lock``."""
        self._ranged = {
            prefix: kept
            for prefix, entries in self._ranged.items()
            if (kept := [entry for entry in entries if keep(entry[2], entry[3])])
        }
        self._listed = {
            key: still
            for key, held in self._listed.items()
            if (still := [entry for entry in held if keep(*entry)])
        }
        self._ranged_arrays = {}  # made again at the next lookup of each prefix
        self._summarised = sum(map(len, self._ranged.values())) + sum(
            map(len, self._listed.values())
        )

    def _read_summaries(self, oldest_ms: int) -> None:
        """``_parts.index`` into :attr:`_summaries` (once; later parts are added as written).

        Only the summaries of parts within the retention are kept; a part wholly older is
        only marked seen (its name, as a part read and found old would be), so what the
        first lookup after a restart holds does not grow with the log's age: the index of a
        server that ran for a month lists ~500,000 parts."""
        assert self.directory is not None
        self._summaries_read = True
        seen = self._disk_seen
        try:
            with open(self.directory / INDEX_FILE, encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    summary = _PartSummary.parse(line)
                    if summary is None:
                        continue
                    if summary.newest_ms < oldest_ms:
                        seen.add(summary.name)
                    else:
                        self._summaries.setdefault(summary.name, summary)
        except FileNotFoundError:
            return

    def _append_summary(self, summary: _PartSummary) -> None:
        """One line more in ``_parts.index`` (no fsync: a line lost in a crash only means its
        part is read once to be indexed again). A failure is not the part's: it is told once
        (:attr:`index_trouble`), and the next line starts on a line of its own; so does a
        process's first line after a crash cut the last one short."""
        if self.reader:  # the writer's index: left to it
            return
        assert self.directory is not None
        with self._index_lock:
            if self._index_torn is None:
                self._index_torn = _ends_torn(self.directory / INDEX_FILE)
            text = ("\n" if self._index_torn else "") + summary.line()
            try:
                with open(self.directory / INDEX_FILE, "a", encoding="utf-8") as index:
                    index.write(text)
            except OSError as exc:
                self._index_torn = True
                self.index_trouble.failed(exc, "its parts are read once to be indexed")
            else:
                self._index_torn = False
                self.index_trouble.worked()

    def _index_parts(self, oldest_ms: int) -> None:
        """Index the parts not indexed yet and forget those wholly older than ``oldest_ms``
        (their names stay seen, so they are not read again). Caller holds ``_disk_lock``.

        Per call: one listing of the directory's names and a set difference, and a walk of
        the parts within the retention only. (A sorted glob of ``Path`` objects and a walk of
        every part ever written cost 47 ms of CPU per unknown id with 5,000 parts, a part
        every 5 s: ever more with the log's age.) A part with a usable summary is not opened;
        one without is read once (its id and time columns) and its summary added to
        ``_parts.index``."""
        assert self.directory is not None
        if not self._summaries_read:
            self._read_summaries(oldest_ms)
        self._forget_summaries(oldest_ms)
        for path in [p for p, part in self._disk_index.items() if part.newest_ms < oldest_ms]:
            del self._disk_index[path]
        self._segments = [s for s in self._segments if s.newest_ms >= oldest_ms]
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        new = sorted(
            [
                name
                for name in set(names).difference(self._disk_seen)  # set work, in C
                if name.startswith("part-") and name.endswith(".parquet")
            ]
        )
        seen = self._disk_seen
        for name in new:
            path = self.directory / name
            summary = self._summaries.get(name)
            if summary is not None and (summary.newest_ms < oldest_ms or summary.usable):
                seen.add(name)
                if summary.newest_ms >= oldest_ms:
                    self._summarise(path, summary)
                continue
            try:
                table = columns.read_parquet(path, ["prediction_id", "time"])
            except (FileNotFoundError, pa.ArrowInvalid):
                continue
            seen.add(name)
            times = columns.to_numpy(table.column("time"))
            newest = int(times.max()) if len(times) else 0
            if summary is None:
                summary = _PartSummary.of(name, table.column("prediction_id"), newest)
                self._summaries[name] = summary
                self._append_summary(summary)
            if newest < oldest_ms:
                continue
            if summary.usable:
                self._summarise(path, summary)
                continue
            hashes = np.sort(
                np.concatenate(
                    [np.zeros(0, np.int64)]
                    + [  # a row group at a time: no str for every row of a merged part at once
                        np.fromiter(map(hash, chunk.to_pylist()), np.int64, len(chunk))
                        for chunk in table.column("prediction_id").chunks
                    ]
                )
            )
            self._disk_index[path] = _PartIndex(hashes, newest)
            if len(self._disk_index) >= SEGMENT_PARTS:
                self._segments.append(_Segment.merge(self._disk_index))
                self._disk_index = {}

    def replay_rows(
        self,
        *,
        model_version: int | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Iterator[LoggedPrediction]:
        """Persisted rows in time order, optionally one model version and ``[start, end)``.

        Each row once while parts are merged meanwhile (this process's flusher or another's):
        a part gone when its turn comes is read from the merged part that replaced it, less
        the rows of its parts already read (``xylen.replaces`` gives their row counts), and a
        merged part listed beside parts it replaces skips theirs."""
        done: set[str] = set()
        listed = self.part_files()
        for path in listed:
            if path.name in done:
                continue
            try:
                part = pq.ParquetFile(path)
            except FileNotFoundError:
                holder = self._merged_holder(path.name, {p.name for p in listed})
                if holder is None:
                    continue
                try:
                    part = pq.ParquetFile(holder)
                except FileNotFoundError:
                    continue
                path = holder
            with part:  # a row group at a time: a merged part is big
                read = _replaced_rows(part, done)
                done.add(path.name)
                at = 0
                for group in range(part.num_row_groups):
                    table = part.read_row_group(group)
                    times = columns.to_numpy(table.column("time"))
                    versions = columns.to_numpy(table.column("model_version"))
                    keep = ~read[at : at + len(times)]
                    at += len(times)
                    if model_version is not None:
                        keep &= versions == model_version
                    if start_ms is not None:
                        keep &= times >= start_ms
                    if end_ms is not None:
                        keep &= times < end_ms
                    if keep.any():
                        yield from _rows(table, keep)

    def _merged_holder(self, name: str, listed: set[str]) -> Path | None:
        """The merged part, not in ``listed``, that replaced the part ``name`` (None: none)."""
        for path in self.part_files():
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

    # -- persistence ------------------------------------------------------------------------

    def flush(self) -> Path | None:
        """Write the buffered rows now as one part file; returns it (None if nothing was
        buffered or the log is memory-only)."""
        with self._flush_lock:
            with self._lock:
                if self.directory is None:
                    return None
                if self.reader:
                    return None
                taken = self._spilled
                self._spilled = []
                if self._next > self._unflushed:
                    taken.append(self._copy(self._unflushed, self._next))
                    self._unflushed = self._next
            if not taken:
                return None
            try:
                written = self._write_part(taken)
            except BaseException:
                self._keep_for_retry(taken)
                raise
            self._told_dropped()
            return written

    def _keep_for_retry(self, taken: list[_Rows]) -> None:
        """Rows whose part could not be written go back ahead of those taken since, so the
        next flush writes them (a full disk once lost them from the history for good). While
        the disk stays full at most the ring's worth of rows waits: the oldest go first,
        counted in ``dropped_rows``."""
        with self._lock:
            # One batch per feature width, however many flushes failed: record() sums the
            # batches' lengths on every call.
            waiting = _coalesce(taken + self._spilled)
            ring = self._ring
            limit = ring.capacity if ring is not None else self.max_rows
            total = sum(len(rows) for rows in waiting)
            dropped = 0
            while len(waiting) > 1 and total - len(waiting[0]) >= limit:
                total -= len(waiting[0])
                dropped += len(waiting.pop(0))
            if total > limit:  # one batch's rows alone pass the limit: keep its newest
                waiting[0] = _tail(waiting[0], len(waiting[0]) - (total - limit))
                dropped += total - limit
            self._spilled = waiting
            self.dropped_rows += dropped
        if dropped and self._dropping_since is None:  # once a spell, not every retry
            self._dropping_since = self.dropped_rows - dropped
            logger.error(
                "prediction log: %d rows could not be written and are dropped (%d so far); "
                "%d wait for the disk; the total is told once it has room",
                dropped,
                self.dropped_rows,
                min(total, limit),
            )

    def _told_dropped(self) -> None:
        """After a write that worked: the rows a full disk made the log drop, in one line."""
        if self._dropping_since is None:
            return
        logger.error(
            "prediction log: %d rows were dropped while part files could not be written",
            self.dropped_rows - self._dropping_since,
        )
        self._dropping_since = None

    def _write_part(self, batches: list[_Rows]) -> Path:
        assert self.directory is not None
        table = _to_table(batches)
        name = f"part-{int(batches[0].times[0]):013d}-{next(self._sequence):08d}.parquet"
        final = self.directory / name
        temporary = final.with_name(name + ".tmp")
        try:
            pq.write_table(
                table,
                temporary,
                compression="snappy",
                row_group_size=ROW_GROUP_ROWS,
                use_dictionary=DICTIONARY_COLUMNS,
            )
            if self._fsync:
                fsync_path(temporary)
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)  # a partial part must not hold a full disk
            raise
        if self._fsync:
            fsync_dir(self.directory)
        newest = max(int(batch.times.max()) for batch in batches if len(batch))
        summary = _PartSummary.of(name, [(b.ids, b.fixed_ids) for b in batches], newest)
        self._summaries[name] = summary
        self._append_summary(summary)
        oldest = min(int(batch.times.min()) for batch in batches if len(batch))
        self._track(name, (oldest, newest, len(table)))
        self._wrote = True
        return final

    # -- rollup -----------------------------------------------------------------------------

    def _track(self, name: str, bounds: tuple[int, int, int] | None) -> None:
        """Remember a part for the merge of its window (``bounds``: its oldest and newest time
        and rows, when known). Caller holds ``_flush_lock`` (or is ``__init__``)."""
        first = _part_time(name)
        if first is None or not self._rollup_ms:
            return
        self._windows.setdefault(first - first % self._rollup_ms, []).append(name)
        if bounds is not None:
            self._bounds[name] = bounds

    def roll_up(self) -> Path | None:
        """Merge the parts of the oldest ended window (``rollup_seconds``, by the log's clock)
        into one part; returns it (None: no ended window had two parts to merge). At most one
        window a call, decided from the parts the log knows (no listing); the flusher calls it
        after each flush."""
        with self._flush_lock:
            if self.directory is None or not self._rollup_ms:
                return None
            due = _now_ms() - self._rollup_ms - ROLLUP_GRACE_MS
            while self._windows:
                window = min(self._windows)
                if window > due:
                    return None
                names = self._windows.pop(window)
                if len(names) < 2:
                    for name in names:
                        self._bounds.pop(name, None)
                    continue
                try:
                    return self._roll_window(window, sorted(names))
                except OSError as exc:
                    if not isinstance(exc, FileNotFoundError):  # a full disk: tried again
                        self._windows[window] = names
                    raise
                finally:
                    if window not in self._windows:
                        for name in names:
                            self._bounds.pop(name, None)
            return None

    def _roll_window(self, window: int, names: list[str]) -> Path | None:
        """Merge those of ``names`` (one window's parts, in name order) whose rows all lie in
        the window into one part, streamed a row group at a time. Caller holds
        ``_flush_lock``."""
        directory = self.directory
        assert directory is not None
        if (directory / ROLLUP_FILE).exists():  # the last merge's deletes failed: first those
            self._recover()
        end = window + self._rollup_ms
        inside: list[tuple[int, str, tuple[int, int, int]]] = []  # (position, name, bounds)
        for i, name in enumerate(names):
            bounds = self._bounds.get(name) or _part_rows(directory / name)
            if bounds is not None and bounds[0] >= window and bounds[1] < end:
                inside.append((i, name, bounds))
        if len(inside) < 2:
            return None
        first_at, last_at = inside[0][0], inside[-1][0]
        if last_at - first_at + 1 != len(inside):
            # A part with rows of another window sorts between two of this one's (only rows
            # given times out of order do that): merged, they would read in another order.
            logger.warning(
                "prediction log: the %d parts from %s are left as they are: another window's "
                "rows sort between them",
                len(inside),
                inside[0][1],
            )
            return None
        sources = [name for _, name, _ in inside]
        merged = f"part-{sources[0][5:18]}-{next(self._sequence):08d}.parquet"
        if last_at + 1 < len(names) and names[last_at + 1] < merged:
            return None  # the part after them would sort before the merged part: left alone
        counts = [[name, bounds[2]] for _, name, bounds in inside]
        newest = max(bounds[1] for _, _, bounds in inside)
        final = directory / merged
        temporary = directory / f"_rollup-{merged}.tmp"
        schema = SCHEMA.with_metadata({REPLACES_KEY: json.dumps(counts).encode()})
        summaries: list[_PartSummary] = []
        try:
            with pq.ParquetWriter(
                temporary, schema, compression="snappy", use_dictionary=DICTIONARY_COLUMNS
            ) as writer:
                waiting: list[pa.Table] = []
                held = 0
                for name in sources:
                    known = self._summaries.get(name)  # the parts it wrote, the index's
                    if known is not None:
                        summaries.append(known)
                    with pq.ParquetFile(directory / name) as part:
                        for group in range(part.num_row_groups):
                            table = part.read_row_group(group)
                            if known is None:
                                ids = table.column("prediction_id")
                                summaries.append(_PartSummary.of(merged, ids, newest))
                            waiting.append(table)
                            held += table.num_rows
                            if held >= ROW_GROUP_ROWS:  # whole row groups out, the rest waits
                                joined = pa.concat_tables(waiting)
                                cut = held - held % ROW_GROUP_ROWS
                                writer.write_table(joined.slice(0, cut), ROW_GROUP_ROWS)
                                waiting, held = [joined.slice(cut)], held - cut
                if held:
                    writer.write_table(pa.concat_tables(waiting), ROW_GROUP_ROWS)
            if self._fsync:
                fsync_path(temporary)
            self._write_journal(merged, sources)
            if _rollup_hook is not None:
                _rollup_hook("journal")
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        if self._fsync:
            fsync_dir(directory)
        if _rollup_hook is not None:
            _rollup_hook("renamed")
        summary = _PartSummary.merged(merged, newest, summaries)
        self._summaries[merged] = summary
        self._append_summary(summary)
        try:
            with self._disk_lock:  # a lookup sees the sources or the merged part, not neither
                self._forget_parts(sources)
                for name in sources:
                    (directory / name).unlink(missing_ok=True)
            if self._fsync:
                fsync_dir(directory)
        except OSError as exc:
            # The merged part is in place: the journal stays, so reads leave out the parts
            # not deleted, and the next merge (or start) deletes them before anything else.
            logger.error(
                "prediction log: parts merged into %s could not be deleted (%s); they are "
                "left out of reads and deleted before the next merge",
                merged,
                describe(exc),
            )
            return final
        (directory / ROLLUP_FILE).unlink(missing_ok=True)
        self._index_stale += len(sources)
        if self._index_stale >= max(INDEX_REWRITE_LINES, self._index_kept):
            self._rewrite_index()
        logger.info(
            "prediction log: %d parts merged into %s (%d rows)",
            len(sources),
            merged,
            sum(bounds[2] for _, _, bounds in inside),
        )
        return final

    def _rewrite_index(self) -> None:
        """``_parts.index`` without the lines of parts no longer on disk (merged away) and torn
        ones, so what a restart's first lookup reads stays the size of the live parts' lines
        rather than one a flush for good. Replaced atomically (a crash leaves the old one);
        appends wait meanwhile. Caller holds ``_flush_lock``."""
        assert self.directory is not None
        live = {path.name for path in self.part_files()}
        path = self.directory / INDEX_FILE
        temporary = path.with_name(INDEX_FILE + ".tmp")
        kept = 0
        with self._index_lock:
            try:
                with (
                    open(path, encoding="utf-8", errors="replace") as lines,
                    open(temporary, "w", encoding="utf-8") as out,
                ):
                    listed: set[str] = set()
                    for line in lines:
                        name = _line_part(line)
                        if name in live and name not in listed:
                            out.write(line if line.endswith("\n") else line + "\n")
                            listed.add(name)
                    for name in sorted(live - listed):  # a line lost (appended to a torn one)
                        summary = self._summaries.get(name)
                        if summary is not None:
                            out.write(summary.line())
                            listed.add(name)
                    kept = len(listed)
                os.replace(temporary, path)
            except FileNotFoundError:
                temporary.unlink(missing_ok=True)
            except OSError as exc:
                temporary.unlink(missing_ok=True)
                self.index_trouble.failed(exc, "it keeps the lines of merged parts")
                return
            self._index_torn = False
        self._index_stale, self._index_kept = 0, kept

    def _write_journal(self, merged: str, sources: list[str]) -> None:
        """:data:`ROLLUP_FILE` for a merge, in place and durable before the merged part is."""
        assert self.directory is not None
        path = self.directory / ROLLUP_FILE
        temporary = path.with_name(ROLLUP_FILE + ".tmp")
        with open(temporary, "w", encoding="utf-8") as journal:
            json.dump({"part": merged, "replaces": sources}, journal)
            journal.flush()
            if self._fsync:
                os.fsync(journal.fileno())
        os.replace(temporary, path)
        if self._fsync:
            fsync_dir(self.directory)

    def _recover(self) -> int:
        """Finish a merge a crash (or a failed delete) interrupted between the merged part's
        rename and the deletion of the parts it replaces (their rows would read twice);
        returns the journal's sequence number (kept clear of, so its name is never a new
        part's). Raises if they cannot be deleted (nothing is merged meanwhile)."""
        assert self.directory is not None
        rollup = _read_rollup(self.directory)
        if rollup is None:
            return 0
        merged, replaced = rollup
        if (self.directory / merged).exists():
            for name in replaced:
                (self.directory / name).unlink(missing_ok=True)
            if self._fsync:
                fsync_dir(self.directory)
            (self.directory / ROLLUP_FILE).unlink(missing_ok=True)
            logger.warning(
                "prediction log: finished merging %d parts into %s (interrupted)",
                len(replaced),
                merged,
            )
        # else: stopped before the rename: the parts it names are the live ones
        return _part_sequence(merged)

    def _forget_parts(self, names: list[str]) -> None:
        """Forget what lookups know of parts merged away. Caller holds ``_disk_lock``."""
        assert self.directory is not None
        gone = {self.directory / name for name in names}
        for name in names:
            self._summaries.pop(name, None)
            self._disk_seen.discard(name)
            self._disk_index.pop(self.directory / name, None)
        self._keep_summarised(lambda _, path: path not in gone)
        self._segments = [s for s in (s.without(gone) for s in self._segments) if s is not None]

    def _flusher(self) -> None:
        failed = False
        while True:
            with self._lock:
                deadline = time.monotonic() + self.flush_interval
                while not self._closed and (
                    failed  # a failed write is retried after the interval, not at once
                    or self._next - self._unflushed + self.spilled_pending < self.flush_rows
                ):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wake.wait(remaining)
                closed = self._closed
            try:
                self.flush()
                failed = False
            except Exception as exc:
                # One line when the writes begin to fail and one when they work again, not a
                # traceback every interval for as long as the disk is full.
                self.trouble.failed(
                    exc,
                    f"{self.spilled_pending} rows wait in memory (the oldest let go past "
                    f"{self._ring.capacity if self._ring else self.max_rows}), retried every "
                    f"{self.flush_interval:g}s",
                )
                failed = True
            else:
                self.trouble.worked()
                if not closed and self._wrote and self._rollup_ms:
                    self._roll_up_told()
            if closed:
                return

    def _roll_up_told(self) -> None:
        """:meth:`roll_up` on the flusher: a failure is told once, and the parts stay as they
        are (a full disk: the window is tried again after the next flush)."""
        try:
            self.roll_up()
        except Exception as exc:
            self.rollup_trouble.failed(exc, "the parts stay as they are")
        else:
            self.rollup_trouble.worked()

    def close(self) -> None:
        """Flush what is buffered and stop the flusher thread."""
        with self._lock:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self.flush()

    def __enter__(self) -> PredictionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
