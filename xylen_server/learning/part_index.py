"""What a prediction log knows of its part files without opening them, for lookups by id.

Beside the parts, ``_parts.index`` (:data:`INDEX_FILE`, JSON lines, appended after each part is
in place) says which ids each part can hold without opening it (:class:`_PartSummary`): its
newest time, and for the server's own ids (``<12 hex>-<hex counter>``) the counter range of each
prefix, for any other id a 64-bit BLAKE2b of each (or ``null``: too many to list, the part is
read to be indexed). A lookup after a restart reads this file and opens only the parts that can
hold the id; a part it does not list (written before the index, or the line lost in a crash) is
read once and added to it. A part without a usable summary has its ids' hashes held in memory
(:class:`_PartIndex`), merged :data:`SEGMENT_PARTS` at a time (:class:`_Segment`).

:class:`IndexedParts` holds that knowledge for ``PredictionLog`` (a base class of it): the
summaries, the ranges and listed ids they give, the file's appends and rewrites, and forgetting
parts past the retention or merged away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from xylen_server.learning import arrow_columns as columns
from xylen_server.learning.part_files import _string_offsets, live_parts
from xylen_server.trouble import Trouble

logger = logging.getLogger(__name__)


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
INDEX_REWRITE_LINES = 4096
"""Lines of merged-away parts ``_parts.index`` holds before it is first rewritten without
them; then once they outnumber the lines kept (each line is read a few times at most)."""


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


def _line_part(line: str) -> str | None:
    """The part a ``_parts.index`` line is of (None: a torn or foreign line)."""
    try:
        name = json.loads(line)["part"]
    except (ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


class IndexedParts:
    """The lookups' knowledge of a log's parts (a base class of ``PredictionLog``, whose
    ``directory`` and ``reader`` it reads)."""

    directory: Path | None
    reader: bool

    def _open_index(self) -> None:
        """Nothing known yet: the summaries are read from ``_parts.index`` at the first
        lookup."""
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
        self._index_stale = 0  # lines of _parts.index whose part was merged away
        self._index_kept = 0  # lines kept at its last rewrite

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

    def _merged_away(self, lines: int) -> None:
        """``lines`` lines more of ``_parts.index`` are of parts merged away: the file is
        rewritten without them once they pass :data:`INDEX_REWRITE_LINES`, then once they
        outnumber the lines kept. Caller holds ``_flush_lock``."""
        self._index_stale += lines
        if self._index_stale >= max(INDEX_REWRITE_LINES, self._index_kept):
            self._rewrite_index()

    def _rewrite_index(self) -> None:
        """``_parts.index`` without the lines of parts no longer on disk (merged away) and torn
        ones, so what a restart's first lookup reads stays the size of the live parts' lines
        rather than one a flush for good. Replaced atomically (a crash leaves the old one);
        appends wait meanwhile. Caller holds ``_flush_lock``."""
        assert self.directory is not None
        live = {path.name for path in live_parts(self.directory)}
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
