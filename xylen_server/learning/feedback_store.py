"""Durable trade outcomes for retraining: acknowledged means committed to SQLite and fsynced.

:meth:`FeedbackStore.append` returns only once its record is committed to the store's SQLite
file (WAL mode, ``synchronous=FULL``: :func:`~xylen_server.durable.sqlite_connect`). One writer
thread does group commit: every record queued while the previous commit ran goes into the next
transaction, so many concurrent appenders share one fsync. Idempotency is the primary key of
``stored_ids``: the same prediction id twice is stored once and answered ``duplicate``, also
after its record moved to Parquet. Records are compacted from SQLite into Snappy Parquet parts
for training. The files, their schema and how to read them are
:mod:`~xylen_server.learning.samples`'.

A failed commit (a full disk, an I/O error) answers the records of that transaction UNAVAILABLE
(FEEDBACK_STORE_FAILED) and drops the connection; the next append opens a fresh one and tries
again, so the store recovers by itself once the disk has room.

Compaction, step by step, each crash-safe: (1) write the uncompacted samples ``lo..hi`` to
``part-<lo>-<hi>.parquet.tmp`` and fsync it; (2) rename it to ``part-<lo>-<hi>.parquet`` and
fsync the directory; (3) delete samples ``lo..hi`` from SQLite. At open, ``*.tmp`` files are
deleted (a crash before 2: SQLite still holds the samples) and samples whose ``seq`` a part
covers are deleted (a crash between 2 and 3). No step loses or duplicates a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from training.metadata import fsync_dir
from xylen_server.durable import sqlite_connect
from xylen_server.errors import Unavailable
from xylen_server.learning import arrow_columns as columns
from xylen_server.learning.samples import (
    DB_NAME,
    PARTS_DIR,
    SAMPLE_COLUMNS,
    SQL_SCHEMA,
    FeedbackRecord,
    add_missing_columns,
    compacted_until,
    part_files,
    read_samples,
    sample_row,
    uncompacted,
)
from xylen_server.settings import Settings
from xylen_server.trouble import Trouble

if TYPE_CHECKING:
    import polars as pl

logger = logging.getLogger(__name__)

_INSERT_ID = "INSERT INTO stored_ids VALUES (?)"
_LOOKUP_CHUNK = 500
"""Ids looked up per query (SQLite allows 32766 parameters; smaller keeps each query quick)."""
_INSERT_SAMPLE = "INSERT INTO samples ({}) VALUES ({})".format(
    SAMPLE_COLUMNS, ", ".join("?" for _ in SAMPLE_COLUMNS.split(","))
)
_FAILED_RETRY_SECONDS = 1.0
"""A compaction that failed is tried again no sooner than this (a full disk stays full)."""
_SLOW_LOG_SECONDS = 10.0
"""At most one slow-commit warning this often (a slow disk would otherwise log per commit)."""


@dataclass(frozen=True)
class AppendResult:
    """What Feedback answers: whether the id was already stored, and the count so far."""

    duplicate: bool
    stored_samples: int


class _Waiter:
    """Completion of one queued append, for a thread (an event) or an event loop (a future)."""

    __slots__ = ("error", "event", "future", "loop", "result")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self.event: threading.Event | None = threading.Event() if loop is None else None
        self.future: asyncio.Future[AppendResult] | None = (
            None if loop is None else loop.create_future()
        )
        self.result: AppendResult | None = None
        self.error: BaseException | None = None

    def settle(self) -> None:
        """Hand the outcome over (on the waiter's loop for a future)."""
        if self.event is not None:
            self.event.set()
            return
        future = self.future
        if future is None or future.done():  # done: the caller was cancelled
            return
        if self.error is not None:
            future.set_exception(self.error)
        else:
            future.set_result(self.result)  # type: ignore[arg-type]

    def wait(self) -> AppendResult:
        assert self.event is not None
        self.event.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _settle_all(waiters: list[_Waiter]) -> None:
    for waiter in waiters:
        waiter.settle()


def _wake(waiters: list[_Waiter]) -> None:
    """Settle every waiter: threads at once, each event loop with one call for all of its own
    (one wake-up of the loop per commit, not one per record)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Waiter]] = {}
    for waiter in waiters:
        if waiter.loop is None:
            waiter.settle()
        else:
            by_loop.setdefault(waiter.loop, []).append(waiter)
    for loop, own in by_loop.items():
        # RuntimeError: the caller's loop is closed; nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle_all, own)


def _stored_among(db: sqlite3.Connection, ids: list[str]) -> set[str]:
    """Which of ``ids`` are in ``stored_ids`` (a few queries for a whole batch)."""
    found: set[str] = set()
    for start in range(0, len(ids), _LOOKUP_CHUNK):
        chunk = ids[start : start + _LOOKUP_CHUNK]
        marks = ",".join("?" * len(chunk))
        query = f"SELECT prediction_id FROM stored_ids WHERE prediction_id IN ({marks})"
        found.update(pid for (pid,) in db.execute(query, chunk))
    return found


@dataclass
class _Entry:
    record: FeedbackRecord
    waiter: _Waiter


class FeedbackStore:
    """SQLite-backed, idempotent, compacting store of :class:`FeedbackRecord`.

    Thread-safe. ``append`` blocks until durable; ``append_async`` awaits the same without
    blocking the event loop. One process per directory (a lock file says so).
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        group_commit: bool = Settings.feedback_group_commit,
        compact_rows: int = Settings.feedback_compact_rows,
        compact_on_close: bool = True,
        fault_hook: Callable[[str], None] | None = None,
        slow_commit_ms: float = Settings.feedback_slow_commit_ms,
        count_failure: Callable[[str], None] | None = None,
    ) -> None:
        """
        Args:
            directory: data directory; ``feedback.sqlite3`` and ``training_samples/`` go under
                it.
            group_commit: commit every append queued while the last commit ran in one
                transaction (off: one transaction per append, in turn; for the benchmark).
            compact_rows: compact in the background once SQLite holds this many uncompacted
                samples (0: only when :meth:`compact` is called).
            compact_on_close: compact everything at :meth:`close`.
            fault_hook: test-only; called with the name of each compaction step
                (``part_written``, ``part_renamed``, ``rows_deleted``) to inject crashes.
            slow_commit_ms: a commit slower than this is counted in ``slow_commits`` and
                logged (``FEEDBACK_SLOW_COMMIT_MS``; 0: never).
            count_failure: called with the part (``feedback_commit``,
                ``feedback_compaction``) at every failed commit or background compaction (the
                server's ``xylen_storage_failures_total{part}``).
        """
        self.directory = Path(directory)
        self.db_path = self.directory / DB_NAME
        self.samples_dir = self.directory / PARTS_DIR
        self.group_commit = group_commit
        self.compact_rows = compact_rows
        self.compact_on_close = compact_on_close
        self._fault_hook = fault_hook
        self.commit_count = 0
        """Transactions committed (fsynced) so far; group commit makes it far below the
        appends (the benchmark and tests read it)."""
        self.commit_seconds = 0.0
        """Time spent in successful commits (transaction and fsync), summed."""
        self.slowest_commit_seconds = 0.0
        self.slow_commits = 0
        """Commits slower than ``slow_commit_ms``: a slow disk shows here and in the log."""
        self._slow_seconds = slow_commit_ms / 1000.0
        self._slow_logged_at = 0.0  # time.monotonic() of the last slow-commit warning
        self._slow_unlogged = 0  # slow commits since that warning
        self._commit_trouble = Trouble("feedback_commit", "the store", logger, count_failure)
        """Failed commits (a full disk): counted, logged when they begin and end."""
        self._compact_trouble = Trouble(
            "feedback_compaction", "writing a part", logger, count_failure
        )
        """Failed background compactions: counted, logged when they begin and end."""

        self._lock = threading.Lock()  # queue, counts, closing
        self._wake = threading.Condition(self._lock)
        self._queue: list[_Entry] = []
        self._closing = False
        self._closed = threading.Event()
        self._write_lock = threading.Lock()  # the writing connection and its transactions
        self._read_lock = threading.Lock()  # the lookup connection (``in``)
        self._compact_lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._count = 0  # ids stored
        self._uncompacted = 0  # samples in SQLite after ``_compacted``
        self._compacted = 0  # the highest seq in a Parquet part
        self._deleted_until = 0  # samples up to this seq are deleted from SQLite
        self._next_seq = 1
        self._open()

        self._compact_wanted = threading.Event()
        self._threads = [
            threading.Thread(target=self._compactor, name="feedback-compactor", daemon=True),
            threading.Thread(target=self._writer, name="feedback-writer", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._maybe_compact()

    # -- open and recovery --------------------------------------------------------------------

    def _open(self) -> None:
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        # One process per store: a second one would compact the same samples again.
        self._lock_fd = os.open(self.directory / "feedback.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"{self.directory} is open in another process") from None
        try:
            for stale in self.samples_dir.glob("*.tmp"):
                stale.unlink()
            with self._write_lock:
                self._connect()
            self._lookup = sqlite_connect(self.db_path, read_only=True)
        except BaseException:
            self._disconnect()
            os.close(self._lock_fd)
            raise

    def _connect(self) -> sqlite3.Connection:
        """The writing connection, opened (and the store recovered) if it is not; caller holds
        ``_write_lock``."""
        if self._db is not None:
            return self._db
        db = sqlite_connect(self.db_path)
        try:
            db.executescript(SQL_SCHEMA)
            add_missing_columns(db)  # a store written before a column existed
            compacted = compacted_until(self.directory)
            # A crash between a part's rename and the delete of its rows: the part has them.
            db.execute("DELETE FROM samples WHERE seq <= ?", (compacted,))
            (count,) = db.execute("SELECT COUNT(*) FROM stored_ids").fetchone()
            if count == 0 and compacted:
                count = self._import_ids(db)
            uncompacted, last = db.execute("SELECT COUNT(*), MAX(seq) FROM samples").fetchone()
        except BaseException:
            db.close()
            raise
        with self._lock:
            self._count, self._uncompacted, self._compacted = count, uncompacted, compacted
        self._deleted_until = compacted
        self._next_seq = max(last or 0, compacted) + 1
        self._db = db
        return db

    def _import_ids(self, db: sqlite3.Connection) -> int:
        """Parts but no stored ids (a directory written before ids were kept in SQLite, or
        whose database was lost): the parts' ids become the stored ids, once."""
        db.execute("BEGIN IMMEDIATE")
        for part in part_files(self.directory):
            ids = columns.read_parquet(part, ["prediction_id"]).column(0).to_pylist()
            db.executemany("INSERT OR IGNORE INTO stored_ids VALUES (?)", ((pid,) for pid in ids))
        db.execute("COMMIT")
        (count,) = db.execute("SELECT COUNT(*) FROM stored_ids").fetchone()
        logger.warning("feedback store %s: %d stored ids taken from its parts", self.db_path, count)
        return int(count)

    def _disconnect(self) -> None:
        """Drop the writing connection after a failure (the next write opens a fresh one);
        caller holds ``_write_lock`` or is the only user."""
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):
                db.close()

    # -- appending ------------------------------------------------------------------------------

    def __contains__(self, prediction_id: object) -> bool:
        """True if an outcome for ``prediction_id`` is stored (committed)."""
        try:
            with self._read_lock:
                row = self._lookup.execute(
                    "SELECT 1 FROM stored_ids WHERE prediction_id = ?", (prediction_id,)
                ).fetchone()
        except sqlite3.Error as exc:
            raise Unavailable(
                f"the feedback store cannot be read: {exc}", reason="FEEDBACK_STORE_FAILED"
            ) from exc
        return row is not None

    def count(self) -> int:
        """Records durably stored (in SQLite and Parquet)."""
        with self._lock:
            return self._count

    def append(self, record: FeedbackRecord) -> AppendResult:
        """Store ``record`` once; returns after it is committed (or, for a duplicate, after the
        original is). Raises :class:`Unavailable` if the commit failed (try again)."""
        waiter = _Waiter()
        self._enqueue(record, waiter)
        return waiter.wait()

    async def append_async(self, record: FeedbackRecord) -> AppendResult:
        """:meth:`append` for the event loop: it never blocks the loop."""
        waiter = _Waiter(asyncio.get_running_loop())
        self._enqueue(record, waiter)
        assert waiter.future is not None
        return await waiter.future

    def _enqueue(self, record: FeedbackRecord, waiter: _Waiter) -> None:
        record.check_storable()  # a bad record fails alone, never its whole transaction
        with self._lock:
            if self._closing:
                raise Unavailable("the feedback store is closing", reason="FEEDBACK_STORE_CLOSED")
            self._queue.append(_Entry(record, waiter))
            self._wake.notify()

    def _writer(self) -> None:
        """The group-commit loop: everything queued while the last commit ran, one commit."""
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                if self.group_commit:
                    batch, self._queue = self._queue, []
                else:
                    batch = [self._queue.pop(0)]
            try:
                with self._write_lock:
                    self._commit(batch)
            except Exception as exc:
                self._commit_trouble.failed(
                    exc,
                    "Feedback answers UNAVAILABLE (FEEDBACK_STORE_FAILED, not acknowledged) "
                    "until a commit works",
                )
                error = Unavailable(
                    f"the feedback store could not commit ({exc}); not acknowledged, try again",
                    reason="FEEDBACK_STORE_FAILED",
                )
                for entry in batch:
                    entry.waiter.error = error
            else:
                self._commit_trouble.worked()
            _wake([entry.waiter for entry in batch])
            self._maybe_compact()

    def _commit(self, batch: list[_Entry]) -> None:
        """One transaction for ``batch``; sets each waiter's result. Caller holds
        ``_write_lock``. On failure the connection is dropped, so the next batch starts from
        what is on disk."""
        seq = self._next_seq
        rows = []
        new = []
        started = time.perf_counter()
        try:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")  # the one writer: nothing changes until COMMIT
            seen = _stored_among(db, [entry.record.prediction_id for entry in batch])
            for entry in batch:
                stored = entry.record.prediction_id not in seen
                if stored:
                    seen.add(entry.record.prediction_id)
                    rows.append(sample_row(seq, entry.record))
                    seq += 1
                new.append(stored)
            db.executemany(_INSERT_ID, ((row[1],) for row in rows))
            db.executemany(_INSERT_SAMPLE, rows)
            db.execute("COMMIT")
        except BaseException:
            self._disconnect()
            raise
        self._next_seq = seq
        self.commit_count += 1
        self._timed(time.perf_counter() - started, len(batch))
        with self._lock:
            before = self._count
            self._count += len(rows)
            self._uncompacted += len(rows)
            total = self._count
        for entry, stored in zip(batch, new, strict=True):
            if stored:
                before += 1
            entry.waiter.result = AppendResult(not stored, before if stored else total)

    def _timed(self, seconds: float, records: int) -> None:
        """Account one commit's time; warn (rate-limited) when the disk makes it slow."""
        self.commit_seconds += seconds
        self.slowest_commit_seconds = max(self.slowest_commit_seconds, seconds)
        if not self._slow_seconds or seconds < self._slow_seconds:
            return
        self.slow_commits += 1
        self._slow_unlogged += 1
        now = time.monotonic()
        if now - self._slow_logged_at >= _SLOW_LOG_SECONDS:
            logger.warning(
                "slow feedback disk: %d commits over %.0f ms since the last warning, this one "
                "%.0f ms for %d records (slowest so far %.0f ms) in %s",
                self._slow_unlogged,
                self._slow_seconds * 1000,
                seconds * 1000,
                records,
                self.slowest_commit_seconds * 1000,
                self.db_path,
            )
            self._slow_logged_at = now
            self._slow_unlogged = 0

    # -- compaction -----------------------------------------------------------------------------

    def _maybe_compact(self) -> None:
        if self.compact_rows and self._uncompacted >= self.compact_rows:
            self._compact_wanted.set()

    def _compactor(self) -> None:
        while True:
            self._compact_wanted.wait()
            self._compact_wanted.clear()
            if self._closing:
                return
            try:
                self.compact()
            except Exception as exc:
                # One line when compaction begins to fail and one when it works again, not a
                # traceback per attempt for as long as the disk is full.
                self._compact_trouble.failed(
                    exc,
                    f"the samples stay in SQLite (durable), retried after the next commit, "
                    f"at most every {_FAILED_RETRY_SECONDS:g}s",
                )
                self._closed.wait(_FAILED_RETRY_SECONDS)
            else:
                self._compact_trouble.worked()

    def _step(self, name: str) -> None:
        if self._fault_hook is not None:
            self._fault_hook(name)

    def compact(self) -> Path | None:
        """Move every sample now in SQLite into a new Parquet part; returns it (None if there
        was none). Appends go on meanwhile: only the rename and the delete hold the writer."""
        with self._compact_lock:
            reader = sqlite_connect(self.db_path, read_only=True)
            try:
                table, first, last = uncompacted(reader, self._compacted)
            finally:
                reader.close()
            part: Path | None = None
            temporary: Path | None = None
            if table.num_rows:
                part = self.samples_dir / f"part-{first:016d}-{last:016d}.parquet"
                temporary = part.with_name(part.name + ".tmp")
                try:
                    pq.write_table(table, temporary, compression="snappy")
                    with open(temporary, "rb") as handle:
                        os.fsync(handle.fileno())
                except BaseException:
                    # A partial part must not hold a full disk (the next try, with more
                    # samples, writes another name).
                    temporary.unlink(missing_ok=True)
                    raise
                self._step("part_written")
            with self._write_lock:  # no reconnect (which recovers from the parts) meanwhile
                if part is not None and temporary is not None:
                    os.replace(temporary, part)
                    with self._lock:
                        self._compacted = last
                        self._uncompacted -= table.num_rows
                if self._deleted_until < self._compacted:  # also what a failed delete left
                    fsync_dir(self.samples_dir)  # the part is there before its rows go
                    self._step("part_renamed")
                    try:
                        self._connect().execute(
                            "DELETE FROM samples WHERE seq <= ?", (self._compacted,)
                        )
                    except BaseException:
                        self._disconnect()
                        raise
                    self._deleted_until = self._compacted
                    self._step("rows_deleted")
            return part

    # -- reading --------------------------------------------------------------------------------

    def part_files(self) -> list[Path]:
        """Compacted Parquet parts, oldest first."""
        return part_files(self.directory)

    def read_samples(self) -> pl.DataFrame:
        """Every stored record, compacted or not (see
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
        self._closed.set()
        self._compact_wanted.set()
        for thread in self._threads:
            thread.join()
        if self.compact_on_close:
            try:
                self.compact()
            except Exception:
                logger.exception("compaction at close failed; the samples stay in SQLite")
        with self._read_lock:
            self._lookup.close()
        with self._write_lock:
            self._disconnect()
        os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
