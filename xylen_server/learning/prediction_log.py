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

Columns: ``prediction_id`` (string), ``time`` (timestamp[ms, UTC], when the server predicted),
``model_name`` (string), ``model_version`` (int64), ``features`` (list<float32>, in the model's
``feature_names`` order, exactly the values the model ran on), ``probability_up`` (float64),
``signal`` (int32, the ``xylen.v1.Signal`` value: 1 BUY, 2 SELL, 3 HOLD). Any tool reads it::

    polars.read_parquet("model_server/data/prediction_log/*.parquet")
    pyarrow.parquet.read_table("model_server/data/prediction_log")
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.metadata import fsync_dir
from xylen_server import clock
from xylen_server.settings import Settings

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


class _Batch(NamedTuple):
    """One Predict batch, kept whole: indexing rows costs one dict insert each (a NamedTuple:
    building it is several times cheaper than a frozen dataclass)."""

    ids: Sequence[str]
    time_ms: int
    model_name: str
    model_version: int
    features: np.ndarray
    probabilities: np.ndarray
    signals: np.ndarray

    def row(self, index: int) -> LoggedPrediction:
        return LoggedPrediction(
            self.ids[index],
            self.time_ms,
            self.model_name,
            self.model_version,
            self.features[index],
            float(self.probabilities[index]),
            int(self.signals[index]),
        )


@dataclass(frozen=True)
class _PartIndex:
    """The sorted hashes of one part's prediction ids and its newest prediction time."""

    hashes: np.ndarray
    newest_ms: int

    def holds(self, key: int) -> bool:
        at = int(np.searchsorted(self.hashes, key))
        return at < len(self.hashes) and int(self.hashes[at]) == key


def _now_ms() -> int:
    return clock.now_ms()


class PredictionLog:
    """Bounded in-memory index of recent predictions plus a Parquet history of all of them.

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
    ) -> None:
        """
        Args:
            directory: where part files go (created if missing); None persists nothing.
            max_rows: most rows kept in memory for :meth:`get` (oldest batches dropped first).
            max_age_seconds: rows older than this are dropped from memory.
            flush_rows: the flusher writes as soon as this many rows are buffered.
            flush_interval_seconds: ... and at least this often while rows are buffered.
            fsync: fsync each part file before its rename (on the flusher thread, never on
                the Predict path).
        """
        if max_rows < 1 or flush_rows < 1 or flush_interval_seconds <= 0 or max_age_seconds <= 0:
            raise ValueError("max_rows, flush_rows, flush interval and max age must be positive")
        self.directory = Path(directory) if directory is not None else None
        self.max_rows = max_rows
        self.max_age_ms = int(max_age_seconds * 1000)
        self.flush_rows = flush_rows
        self.flush_interval = flush_interval_seconds
        self._fsync = fsync
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._index: dict[str, tuple[_Batch, int]] = {}
        self._window: deque[_Batch] = deque()
        self._window_rows = 0
        self._pending: list[_Batch] = []
        self._pending_rows = 0
        self._flush_lock = threading.Lock()  # one writer of part files at a time
        self._disk_lock = threading.Lock()
        self._disk_index: dict[Path, _PartIndex] = {}
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob("*.tmp"):
                stale.unlink()
            self._sequence = itertools.count(self._last_sequence() + 1)
            self._thread = threading.Thread(
                target=self._flusher, name="prediction-log-flusher", daemon=True
            )
            self._thread.start()

    # -- hot path ---------------------------------------------------------------------------

    def record(
        self,
        prediction_ids: Sequence[str],
        features: np.ndarray,
        probabilities: np.ndarray | Sequence[float],
        signals: np.ndarray | Sequence[int],
        model_name: str,
        model_version: int,
        time_ms: int | None = None,
    ) -> None:
        """Remember one Predict batch. Cheap: no I/O; the arrays are kept, not copied, so the
        caller must not modify them afterwards (``feature_matrix`` returns a fresh array)."""
        batch = _Batch(
            prediction_ids,
            _now_ms() if time_ms is None else time_ms,
            model_name,
            model_version,
            np.asarray(features, dtype=np.float32),
            np.asarray(probabilities, dtype=np.float64),
            np.asarray(signals, dtype=np.int32),
        )
        rows = len(prediction_ids)
        with self._lock:
            rows_of_batch = zip(itertools.repeat(batch), range(rows), strict=False)
            self._index.update(zip(prediction_ids, rows_of_batch, strict=True))
            self._window.append(batch)
            self._window_rows += rows
            self._evict(batch.time_ms)
            if self._thread is not None:
                self._pending.append(batch)
                self._pending_rows += rows
                if self._pending_rows >= self.flush_rows:
                    self._wake.notify()

    def _evict(self, now_ms: int) -> None:
        """Drop the oldest batches beyond ``max_rows`` or ``max_age`` (the newest batch always
        stays, so memory holds at most ``max_rows`` plus one batch); caller holds the lock."""
        window = self._window
        oldest_allowed = now_ms - self.max_age_ms
        while len(window) > 1 and (
            self._window_rows > self.max_rows or window[0].time_ms < oldest_allowed
        ):
            batch = window.popleft()
            self._window_rows -= len(batch.ids)
            for prediction_id in batch.ids:
                entry = self._index.get(prediction_id)
                if entry is not None and entry[0] is batch:
                    del self._index[prediction_id]

    # -- lookups ----------------------------------------------------------------------------

    def get(self, prediction_id: str) -> LoggedPrediction | None:
        """The logged row for ``prediction_id`` if it is still held in memory, else None."""
        entry = self._index.get(prediction_id)
        if entry is None:
            return None
        batch, index = entry
        if batch.time_ms < _now_ms() - self.max_age_ms:
            return None
        return batch.row(index)

    def __len__(self) -> int:
        """Rows held in memory."""
        return len(self._index)

    def part_files(self) -> list[Path]:
        """Persisted part files, oldest first."""
        if self.directory is None:
            return []
        return sorted(self.directory.glob("part-*.parquet"))

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
        for path in reversed(self.part_files()):
            table = pq.read_table(path, filters=[("prediction_id", "==", prediction_id)])
            if table.num_rows:
                return next(_rows(table, np.ones(table.num_rows, dtype=bool)))
        return None

    def find_recent(self, prediction_id: str) -> LoggedPrediction | None:
        """The row of ``prediction_id`` if it was predicted within ``max_age_seconds``: from
        memory, else from the part files (what the Feedback join falls back on after a
        restart, or once memory let the row go). Rows still buffered when a process was killed
        (SIGKILL) never reached a part.

        Blocking I/O: call it off the event loop. The first call reads the id and time columns
        of the parts within the retention into an index of id hashes (8 bytes a row, in this
        process only); later calls index only new parts and open at most the parts whose
        index holds the id's hash, so an unknown id costs no scan of the log."""
        found = self.get(prediction_id)
        if found is not None or self.directory is None:
            return found
        oldest = _now_ms() - self.max_age_ms
        key = hash(prediction_id)
        with self._disk_lock:
            self._index_parts(oldest)
            candidates = [
                path
                for path, part in sorted(self._disk_index.items(), reverse=True)
                if part.newest_ms >= oldest and part.holds(key)
            ]
        for path in candidates:
            try:
                table = pq.read_table(path, filters=[("prediction_id", "==", prediction_id)])
            except FileNotFoundError:
                continue
            if table.num_rows:
                row = next(_rows(table, np.ones(table.num_rows, dtype=bool)))
                return row if row.time_ms >= oldest else None
        return None

    def _index_parts(self, oldest_ms: int) -> None:
        """Index the parts not indexed yet; drop the hashes of those wholly older than
        ``oldest_ms`` (their entry stays, so they are not read again). Caller holds
        ``_disk_lock``."""
        for path, part in list(self._disk_index.items()):
            if part.newest_ms < oldest_ms and len(part.hashes):
                self._disk_index[path] = _PartIndex(np.empty(0, np.int64), part.newest_ms)
        for path in self.part_files():
            if path in self._disk_index:
                continue
            try:
                table = pq.read_table(path, columns=["prediction_id", "time"])
            except (FileNotFoundError, pa.ArrowInvalid):
                continue
            times = table.column("time").cast(pa.int64()).to_numpy()
            newest = int(times.max()) if len(times) else 0
            if newest < oldest_ms:
                self._disk_index[path] = _PartIndex(np.empty(0, np.int64), newest)
                continue
            ids = table.column("prediction_id").to_pylist()
            hashes = np.sort(np.fromiter((hash(i) for i in ids), dtype=np.int64, count=len(ids)))
            self._disk_index[path] = _PartIndex(hashes, newest)

    def replay_rows(
        self,
        *,
        model_version: int | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Iterator[LoggedPrediction]:
        """Persisted rows in time order, optionally one model version and ``[start, end)``."""
        for path in self.part_files():
            table = pq.read_table(path)
            times = table.column("time").cast(pa.int64()).to_numpy()
            versions = table.column("model_version").to_numpy()
            keep = np.ones(len(times), dtype=bool)
            if model_version is not None:
                keep &= versions == model_version
            if start_ms is not None:
                keep &= times >= start_ms
            if end_ms is not None:
                keep &= times < end_ms
            if not keep.any():
                continue
            yield from _rows(table, keep)

    # -- persistence ------------------------------------------------------------------------

    def flush(self) -> Path | None:
        """Write the buffered rows now as one part file; returns it (None if nothing was
        buffered or the log is memory-only)."""
        with self._flush_lock:
            with self._lock:
                batches, self._pending, self._pending_rows = self._pending, [], 0
            if not batches or self.directory is None:
                return None
            return self._write_part(batches)

    def _write_part(self, batches: list[_Batch]) -> Path:
        assert self.directory is not None
        table = _to_table(batches)
        name = f"part-{batches[0].time_ms:013d}-{next(self._sequence):08d}.parquet"
        final = self.directory / name
        temporary = final.with_name(name + ".tmp")
        pq.write_table(table, temporary, compression="snappy")
        if self._fsync:
            fd = os.open(temporary, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(temporary, final)
        if self._fsync:
            fsync_dir(self.directory)
        return final

    def _last_sequence(self) -> int:
        last = 0
        for path in self.part_files():
            try:
                last = max(last, int(path.stem.rsplit("-", 1)[1]))
            except (IndexError, ValueError):
                continue
        return last

    def _flusher(self) -> None:
        while True:
            with self._lock:
                deadline = time.monotonic() + self.flush_interval
                while not self._closed and self._pending_rows < self.flush_rows:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wake.wait(remaining)
                closed = self._closed
            try:
                self.flush()
            except Exception:
                logger.exception("prediction log flush failed; rows stay buffered for retry")
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


def _to_table(batches: list[_Batch]) -> pa.Table:
    ids = [i for batch in batches for i in batch.ids]
    counts = [len(batch.ids) for batch in batches]
    matrices = [batch.features.reshape(len(batch.ids), -1) for batch in batches]
    widths = np.repeat([m.shape[1] for m in matrices], counts)
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(widths, out=offsets[1:])
    flat = np.concatenate([m.ravel() for m in matrices]) if matrices else np.empty(0, np.float32)
    features = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()))
    return pa.Table.from_arrays(
        [
            pa.array(ids, type=pa.string()),
            pa.array(np.repeat([b.time_ms for b in batches], counts), type=pa.int64()).cast(
                pa.timestamp("ms", tz="UTC")
            ),
            pa.array(np.repeat([b.model_name for b in batches], counts), type=pa.string()),
            pa.array(np.repeat([b.model_version for b in batches], counts), type=pa.int64()),
            features,
            pa.array(np.concatenate([b.probabilities for b in batches]), type=pa.float64()),
            pa.array(np.concatenate([b.signals for b in batches]), type=pa.int32()),
        ],
        schema=SCHEMA,
    )


def _rows(table: pa.Table, keep: np.ndarray) -> Iterator[LoggedPrediction]:
    """The rows of a part-file table where ``keep`` is true."""
    times = table.column("time").cast(pa.int64()).to_numpy()
    versions = table.column("model_version").to_numpy()
    features = table.column("features").combine_chunks()
    flat = features.flatten().to_numpy(zero_copy_only=False)
    offsets = features.offsets.to_numpy()
    ids = table.column("prediction_id").to_pylist()
    names = table.column("model_name").to_pylist()
    probabilities = table.column("probability_up").to_numpy()
    signals = table.column("signal").to_numpy()
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
