"""Durable trade outcomes for retraining: acknowledged means on disk.

:meth:`FeedbackStore.append` returns only after its record is in the write-ahead log and
fsynced. With group commit (the default) a dedicated writer thread takes every record queued
while the previous fsync ran and writes them with one ``write`` and one ``fdatasync``, so many
concurrent appenders share each fsync. Records are compacted from the log into Snappy Parquet.
The files, their format and how to read them are :mod:`~xylen_server.learning.samples`'.

A dataset of part files, not one ``training_samples.parquet``: appending to a single Parquet file
means rewriting all of it at every compaction.

Crash safety, step by step:

* append: a record is acknowledged after its frame is fsynced. At open a torn or corrupt tail
  (short header, length beyond the file, CRC mismatch) is cut off; every frame before it stays.
* compaction: (1) seal the active segment and start a new one; (2) write the sealed records to
  ``part-<lo>-<hi>.parquet.tmp``, fsync, rename, fsync the directory; (3) delete segments
  ``lo..hi``. At open, ``*.tmp`` files are deleted (crash before 2 finished: the segments still
  hold the records) and segments whose number is at most the highest ``hi`` of a part are deleted
  (crash between 2 and 3: the part holds them). No step loses or duplicates a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from training.metadata import fsync_dir
from xylen_server.errors import Unavailable
from xylen_server.learning.samples import (
    MAGIC,
    PARTS_DIR,
    WAL_DIR,
    FeedbackRecord,
    frame,
    read_samples,
    read_segment,
    records_table,
)
from xylen_server.settings import Settings

if TYPE_CHECKING:
    import polars as pl

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppendResult:
    """What Feedback answers: whether the id was already stored, and the count so far."""

    duplicate: bool
    stored_samples: int


def repair_segment(segment: Path) -> list[FeedbackRecord]:
    """The good records of a segment; a torn or corrupt tail is cut off the file (and fsynced),
    so later appends never follow garbage, and a segment that never got its magic is removed."""
    records, good = read_segment(segment)
    if good == 0:
        segment.unlink()
    elif good < segment.stat().st_size:
        with open(segment, "r+b") as handle:
            handle.truncate(good)
            os.fsync(handle.fileno())
    return records


class _Waiter:
    """Completion of one queued append, for a thread (event) or an event loop (future)."""

    __slots__ = ("error", "event", "future", "loop", "result")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self.future: asyncio.Future[AppendResult] | None = None
        self.event: threading.Event | None = None
        if loop is None:
            self.event = threading.Event()
        else:
            self.future = loop.create_future()
        self.result: AppendResult | None = None
        self.error: BaseException | None = None

    def resolve(self, result: AppendResult | None, error: BaseException | None) -> None:
        self.result, self.error = result, error
        if self.event is not None:
            self.event.set()
        else:
            assert self.loop is not None
            # RuntimeError: the caller's loop is closed; nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        future = self.future
        if future is None or future.done():
            return
        if self.error is not None:
            future.set_exception(self.error)
        else:
            assert self.result is not None
            future.set_result(self.result)

    def wait(self) -> AppendResult:
        assert self.event is not None
        self.event.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@dataclass
class _Entry:
    record: FeedbackRecord
    frame: bytes | None  # None: a duplicate waiting for the original's fsync
    result: AppendResult
    waiter: _Waiter


class FeedbackStore:
    """Write-ahead-logged, idempotent, compacting store of :class:`FeedbackRecord`.

    Thread-safe. ``append`` blocks until durable; ``append_async`` awaits the same without
    blocking the event loop.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        group_commit: bool = Settings.feedback_group_commit,
        compact_rows: int = Settings.feedback_compact_rows,
        compact_on_close: bool = True,
        fault_hook: Callable[[str], None] | None = None,
    ) -> None:
        """
        Args:
            directory: data directory; ``feedback_wal/`` and ``training_samples/`` go under it.
            group_commit: share one fsync between all appends queued while the last one ran
                (off: each append writes and fsyncs alone, in turn; for the benchmark).
            compact_rows: compact in the background once the active WAL segment holds this
                many records (0: only when :meth:`compact` is called).
            compact_on_close: compact everything in the WAL at :meth:`close`.
            fault_hook: test-only; called with the name of each compaction step
                (``part_written``, ``part_renamed``, ``segment_deleted``) to inject crashes.
        """
        self.directory = Path(directory)
        self.wal_dir = self.directory / WAL_DIR
        self.samples_dir = self.directory / PARTS_DIR
        self.group_commit = group_commit
        self.compact_rows = compact_rows
        self.compact_on_close = compact_on_close
        self._fault_hook = fault_hook
        self.fsync_count = 0
        """fsyncs of WAL data so far (the group-commit benchmark and tests read it)."""

        self._lock = threading.Lock()  # ids, counts, queue, in-memory records, parts
        self._wake = threading.Condition(self._lock)
        self._io_lock = threading.Lock()  # the active segment; taken before _lock
        self._compact_lock = threading.Lock()
        self._ids: set[str] = set()
        self._pending_ids: set[str] = set()
        self._count = 0  # stored plus queued
        self._queue: list[_Entry] = []
        self._parts: list[Path] = []
        self._sealed: list[Path] = []
        self._sealed_records: list[FeedbackRecord] = []
        self._active_records: list[FeedbackRecord] = []
        self._failed: BaseException | None = None
        self._closing = False
        self._open()

        self._compact_wanted = threading.Event()
        self._threads = [threading.Thread(target=self._compactor, name="feedback-compactor")]
        if group_commit:
            self._threads.append(threading.Thread(target=self._writer, name="feedback-wal"))
        for thread in self._threads:
            thread.daemon = True
            thread.start()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="feedback-append")
        if self._sealed:  # left in the WAL by the last run
            self._compact_wanted.set()

    # -- open and recovery --------------------------------------------------------------------

    def _open(self) -> None:
        self.wal_dir.mkdir(parents=True, exist_ok=True)
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        # One process per store: a second opener would interleave frames and compactions.
        self._lock_fd = os.open(self.directory / "feedback.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"{self.directory} is open in another process") from None
        for stale in self.samples_dir.glob("*.tmp"):
            stale.unlink()
        covered = 0
        for part in sorted(self.samples_dir.glob("part-*.parquet")):
            covered = max(covered, int(part.stem.split("-")[2]))
            ids = pq.read_table(part, columns=["prediction_id"]).column(0).to_pylist()
            self._ids.update(ids)
            self._parts.append(part)
        last = covered
        for segment in sorted(self.wal_dir.glob("wal-*.log")):
            seq = int(segment.stem.split("-")[1])
            last = max(last, seq)
            if seq <= covered:  # compacted already; the crash came before its deletion
                segment.unlink()
                continue
            for record in repair_segment(segment):
                if record.prediction_id in self._ids:
                    logger.warning("WAL %s repeats %s; kept once", segment, record.prediction_id)
                    continue
                self._ids.add(record.prediction_id)
                self._sealed_records.append(record)
            if segment.exists():
                self._sealed.append(segment)
        self._count = len(self._ids)
        fsync_dir(self.wal_dir)
        self._start_segment(last + 1)

    def _start_segment(self, seq: int) -> None:
        path = self.wal_dir / f"wal-{seq:016d}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        os.write(fd, MAGIC)
        os.fdatasync(fd)
        fsync_dir(self.wal_dir)
        self._active_path, self._active_seq, self._fd = path, seq, fd

    # -- appending ------------------------------------------------------------------------------

    def __contains__(self, prediction_id: object) -> bool:
        """True if an outcome for ``prediction_id`` is stored or being stored."""
        return prediction_id in self._ids

    def count(self) -> int:
        """Records durably stored (WAL and Parquet)."""
        with self._lock:
            return self._count - len(self._pending_ids)

    def append(self, record: FeedbackRecord) -> AppendResult:
        """Store ``record`` once; returns after it is fsynced (or, for a duplicate, after the
        original is). Raises :class:`Unavailable` if the log cannot be written."""
        if not self.group_commit:
            return self._append_alone(record)
        waiter = _Waiter()
        done = self._enqueue(record, waiter)
        return done if done is not None else waiter.wait()

    async def append_async(self, record: FeedbackRecord) -> AppendResult:
        """:meth:`append` for the event loop: it never blocks the loop."""
        if not self.group_commit:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._append_alone, record)
        waiter = _Waiter(asyncio.get_running_loop())
        done = self._enqueue(record, waiter)
        if done is not None:
            return done
        assert waiter.future is not None
        return await waiter.future

    def _check_open(self) -> None:
        if self._failed is not None:
            raise Unavailable(
                f"the feedback log failed and is read-only until restart: {self._failed}",
                reason="FEEDBACK_STORE_FAILED",
            )
        if self._closing:
            raise Unavailable("the feedback store is closing", reason="FEEDBACK_STORE_CLOSED")

    def _enqueue(self, record: FeedbackRecord, waiter: _Waiter) -> AppendResult | None:
        """Queue ``record`` for the writer; returns the answer at once for a stored duplicate."""
        payload = frame(record.encode())  # outside the lock
        with self._lock:
            self._check_open()
            prediction_id = record.prediction_id
            if prediction_id in self._ids:
                if prediction_id not in self._pending_ids:
                    return AppendResult(True, self._count)
                entry = _Entry(record, None, AppendResult(True, self._count), waiter)
            else:
                self._ids.add(prediction_id)
                self._pending_ids.add(prediction_id)
                self._count += 1
                entry = _Entry(record, payload, AppendResult(False, self._count), waiter)
            self._queue.append(entry)
            self._wake.notify()
        return None

    def _writer(self) -> None:
        """The group-commit loop: everything queued while the last fsync ran, one fsync."""
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            error: BaseException | None = None
            with self._io_lock:
                frames = [entry.frame for entry in batch if entry.frame is not None]
                try:
                    if self._failed is not None:
                        raise self._failed
                    self._write(frames)
                except BaseException as exc:
                    error = exc
                with self._lock:
                    for entry in batch:
                        if entry.frame is None:
                            continue
                        self._pending_ids.discard(entry.record.prediction_id)
                        if error is None:
                            self._active_records.append(entry.record)
                        else:
                            self._ids.discard(entry.record.prediction_id)
                            self._count -= 1
                    if error is not None and self._failed is None:
                        self._failed = error
                    active = len(self._active_records)
            if error is not None:
                logger.error("feedback WAL write failed; refusing appends", exc_info=error)
                error = Unavailable(
                    "the feedback log could not be written", reason="FEEDBACK_STORE_FAILED"
                )
            for entry in batch:
                entry.waiter.resolve(None if error else entry.result, error)
            self._maybe_compact(active)

    def _append_alone(self, record: FeedbackRecord) -> AppendResult:
        """No group commit: write and fsync this one record while holding the log."""
        payload = frame(record.encode())
        with self._io_lock:
            with self._lock:
                self._check_open()
                if record.prediction_id in self._ids:
                    return AppendResult(True, self._count)
            try:
                self._write([payload])
            except OSError as exc:
                self._failed = exc
                logger.error("feedback WAL write failed; refusing appends", exc_info=exc)
                raise Unavailable(
                    "the feedback log could not be written", reason="FEEDBACK_STORE_FAILED"
                ) from exc
            with self._lock:
                self._ids.add(record.prediction_id)
                self._count += 1
                self._active_records.append(record)
                result, active = AppendResult(False, self._count), len(self._active_records)
        self._maybe_compact(active)
        return result

    def _write(self, frames: list[bytes]) -> None:
        """Append ``frames`` to the active segment and fdatasync; caller holds ``_io_lock``."""
        if not frames:
            return
        view = memoryview(b"".join(frames))
        while view:
            view = view[os.write(self._fd, view) :]
        os.fdatasync(self._fd)
        self.fsync_count += 1

    # -- compaction -----------------------------------------------------------------------------

    def _maybe_compact(self, active_records: int) -> None:
        if self.compact_rows and active_records >= self.compact_rows:
            self._compact_wanted.set()

    def _compactor(self) -> None:
        while True:
            self._compact_wanted.wait()
            self._compact_wanted.clear()
            if self._closing:
                return
            try:
                self.compact()
            except Exception:
                logger.exception("feedback compaction failed; the records stay in the WAL")

    def _step(self, name: str) -> None:
        if self._fault_hook is not None:
            self._fault_hook(name)

    def compact(self) -> Path | None:
        """Move every record now in the WAL into a new Parquet part; returns it (None if the
        WAL held no records). Appends continue meanwhile, into a fresh segment."""
        with self._compact_lock:
            with self._io_lock:  # no append writes meanwhile, so the records stay put
                with self._lock:
                    rotate = bool(self._active_records)
                    if rotate:
                        self._sealed.append(self._active_path)
                        self._sealed_records.extend(self._active_records)
                        self._active_records = []
                    segments, records = list(self._sealed), list(self._sealed_records)
                if rotate:
                    os.close(self._fd)
                    self._start_segment(self._active_seq + 1)
            part: Path | None = None
            if records:
                first = int(segments[0].stem.split("-")[1])
                last = int(segments[-1].stem.split("-")[1])
                part = self.samples_dir / f"part-{first:016d}-{last:016d}.parquet"
                temporary = part.with_name(part.name + ".tmp")
                pq.write_table(records_table(records), temporary, compression="snappy")
                with open(temporary, "rb") as handle:
                    os.fsync(handle.fileno())
                self._step("part_written")
                os.replace(temporary, part)
                fsync_dir(self.samples_dir)
                self._step("part_renamed")
            with self._lock:
                if part is not None:
                    self._parts.append(part)
                del self._sealed[: len(segments)]
                del self._sealed_records[: len(records)]
            for segment in segments:
                segment.unlink()
                self._step("segment_deleted")
            fsync_dir(self.wal_dir)
            return part

    # -- reading --------------------------------------------------------------------------------

    def part_files(self) -> list[Path]:
        """Compacted Parquet parts, oldest first."""
        with self._lock:
            return list(self._parts)

    def read_samples(self) -> pl.DataFrame:
        """Every stored record, compacted or still in the WAL (see
        :func:`~xylen_server.learning.samples.read_samples`)."""
        return read_samples(self.directory)

    # -- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """Finish queued appends, compact (if ``compact_on_close``) and release the files."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake.notify_all()
        self._compact_wanted.set()
        for thread in self._threads:
            thread.join()
        self._executor.shutdown(wait=True)
        if self.compact_on_close and self._failed is None:
            try:
                self.compact()
            except Exception:
                logger.exception("compaction at close failed; the records stay in the WAL")
        with self._io_lock:
            os.close(self._fd)
        os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
