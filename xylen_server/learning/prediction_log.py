"""What the server predicted on, keyed by prediction id: in memory for the Feedback join, and
as Parquet so any past signal can be replayed bit-exactly against the model version that made it.

The hot path is :meth:`PredictionLog.record`, called once per Predict batch: it appends the batch
to an in-memory buffer (:mod:`~xylen_server.learning.prediction_ring`) and indexes its ids,
nothing more (no I/O, no fsync). A background flusher thread writes the buffer as a Parquet part
file every ``flush_rows`` rows or ``flush_interval_seconds``, whichever comes first. A crash
loses at most the unflushed buffer; the log is a record of what was said, not an
acknowledgment.

The log's rooms, imports running one way (each imports only those above it):

``part_files``       the parts' schema, names and listing (:func:`live_parts`), reading a part
``prediction_ring``  the rows in memory, and rows copied out of it for a part
``part_index``       ``_parts.index``: which ids a part can hold, known without opening it
``part_rollup``      the hourly merge of the parts, its journal and its recovery
``prediction_log``   :class:`PredictionLog`: record, get, find, flush, read, replay

Any tool reads the parts (:mod:`~xylen_server.learning.part_files`)::

    polars.read_parquet("model_server/data/prediction_log/*.parquet")
    pyarrow.parquet.read_table("model_server/data/prediction_log")

but while an hour is merged such a glob can see its rows twice, or miss a part deleted between
its listing and its reading: ``PredictionLog(directory, reader=True)``'s
:meth:`~PredictionLog.read` and :meth:`~PredictionLog.replay_rows` read each row once, changing
nothing in the directory.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import pyarrow.parquet as pq

from training.metadata import fsync_dir, fsync_path
from xylen_server import clock
from xylen_server.learning import arrow_columns as columns
from xylen_server.learning.part_files import (
    DICTIONARY_COLUMNS,
    REPLACES_KEY,
    ROLLUP_FILE,
    ROW_GROUP_ROWS,
    SCHEMA,
    LoggedPrediction,
    _find_in_part,
    _part_sequence,
    _rows,
    live_parts,
    read_once,
)
from xylen_server.learning.part_index import (
    INDEX_FILE,
    SEGMENT_PARTS,
    _PartSummary,
)
from xylen_server.learning.part_rollup import PartRollup
from xylen_server.learning.prediction_ring import (
    ID_BYTES,
    _coalesce,
    _index_batch,
    _Ring,
    _Rows,
    _tail,
    _to_table,
    row_bytes,
)
from xylen_server.settings import Settings
from xylen_server.trouble import Trouble

if TYPE_CHECKING:
    import polars as pl

__all__ = [
    "ID_BYTES",
    "INDEX_FILE",
    "REPLACES_KEY",
    "ROLLUP_FILE",
    "SCHEMA",
    "SEGMENT_PARTS",
    "LoggedPrediction",
    "PredictionLog",
    "live_parts",
    "row_bytes",
]

logger = logging.getLogger(__name__)

_VECTOR_ROWS = 8
"""Batches of more rows than this are indexed with numpy, one probe step for all rows."""
_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)


def _now_ms() -> int:
    return clock.now_ms()


class PredictionLog(PartRollup):
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
        self._open_index()
        self._open_rollup(rollup_seconds)
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
                seq = _index_batch(ring, ids, first, start)
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
            # Spilled rows are neither in the ring nor on disk, so a Feedback for one is not
            # found until they are written (after a swap to another feature width, the
            # predictions just made): the flusher writes them now, not at its next interval.
            self._wake.notify()
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
        buffer), each once while parts are merged meanwhile, as :meth:`replay_rows` reads them
        (:func:`~xylen_server.learning.part_files.read_once`): a glob of the parts can see an
        hour's rows twice, or miss a part deleted between its listing and its reading."""
        import polars as pl

        frames = []
        for table, keep in read_once(self.part_files):
            frame = cast("pl.DataFrame", pl.from_arrow(table))
            frames.append(frame if keep.all() else frame.filter(pl.Series(keep)))
        if not frames:
            return pl.from_arrow(SCHEMA.empty_table())  # type: ignore[return-value]
        return pl.concat(frames)

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

    def replay_rows(
        self,
        *,
        model_version: int | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Iterator[LoggedPrediction]:
        """Persisted rows in time order, optionally one model version and ``[start, end)``.

        Each row once while parts are merged meanwhile (this process's flusher or another's):
        :func:`~xylen_server.learning.part_files.read_once`."""
        for table, keep in read_once(self.part_files):
            times = columns.to_numpy(table.column("time"))
            versions = columns.to_numpy(table.column("model_version"))
            if model_version is not None:
                keep &= versions == model_version
            if start_ms is not None:
                keep &= times >= start_ms
            if end_ms is not None:
                keep &= times < end_ms
            if keep.any():
                yield from _rows(table, keep)

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

    def _flusher(self) -> None:
        failed = False
        while True:
            with self._lock:
                deadline = time.monotonic() + self.flush_interval
                while not self._closed and (
                    failed  # a failed write is retried after the interval, not at once
                    or (not self._spilled and self._next - self._unflushed < self.flush_rows)
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
