"""The prediction log's hourly merge of its parts: the merge, its journal and its recovery.

The parts stay few: a minute after a window of ``rollup_seconds`` has ended (an hour by
default, aligned to the epoch, by the log's clock, :mod:`xylen_server.clock`), the flusher merges
the parts whose rows all lie in it into one part, named as the first of them with a new
sequence, holding their rows in the order the parts gave them (:meth:`PartRollup.roll_up`):
~24 parts a day plus the current hour's, not one a flush (~17,000 a day). One window a flush,
chosen from the parts the log wrote or found at start (no listing), streamed a row group at a
time. The merged part goes to a temporary name (``_rollup-<name>.tmp``) and is fsynced;
``_rollup.json`` (the merged part and the parts it replaces, also in the merged part's Parquet
metadata under ``xylen.replaces``) is made durable; then the part is renamed into place, the
directory fsynced, the replaced parts deleted and ``_rollup.json`` removed. A crash before the
rename leaves the parts as they were; one after it leaves ``_rollup.json``, and
:func:`~xylen_server.learning.part_files.live_parts` (so ``PredictionLog.part_files``, replay)
leaves out the parts it names until the next start deletes them: every row reads once. A part
with rows of two windows stays as it is.

:class:`PartRollup` is a base class of ``PredictionLog``: the merge runs on its flusher, under
its ``_flush_lock``, and tells its lookups (``part_index.IndexedParts``) which parts it merged
away.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from training.metadata import fsync_dir, fsync_path
from xylen_server import clock
from xylen_server.learning.part_files import (
    DICTIONARY_COLUMNS,
    REPLACES_KEY,
    ROLLUP_FILE,
    ROW_GROUP_ROWS,
    SCHEMA,
    _part_rows,
    _part_sequence,
    _part_time,
    _read_rollup,
)
from xylen_server.learning.part_index import IndexedParts, _PartSummary
from xylen_server.trouble import Trouble, describe

logger = logging.getLogger(__name__)

ROLLUP_GRACE_MS = 60_000
"""How long after a window ends (by the log's clock) its parts are merged: a flush every few
seconds has written its last rows by then."""
_rollup_hook: Callable[[str], None] | None = None
"""Tests only: called with ``"journal"`` (the merged part written, not yet in place) and
``"renamed"`` (in place, the parts it replaces not yet deleted), where a crash test stops."""


class PartRollup(IndexedParts):
    """Merges a log's ended windows (a base class of ``PredictionLog``, whose flush lock,
    part sequence and ``fsync`` setting it uses)."""

    _flush_lock: threading.Lock
    _sequence: Iterator[int]
    _fsync: bool

    def _open_rollup(self, rollup_seconds: float) -> None:
        """No part known yet (``__init__`` tracks those it finds, the flusher those it
        writes)."""
        self._rollup_ms = int(rollup_seconds * 1000)
        self._windows: dict[int, list[str]] = {}
        """Window start (ms) -> the parts whose name's time lies in it, not merged yet (the
        parts found at start and those written since). Flusher only (``_flush_lock``)."""
        self._bounds: dict[str, tuple[int, int, int]] = {}
        """Part -> (oldest time, newest time, rows) of the parts this log wrote (read from
        the footer for the others when their window is merged)."""
        self._wrote = False  # a log that writes parts is the directory's writer: it merges
        self.rollup_trouble = Trouble("prediction_log", "the rollup", logger, None)
        """Failed merges (:meth:`roll_up`): logged when they begin and end."""

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
            due = clock.now_ms() - self._rollup_ms - ROLLUP_GRACE_MS
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
        self._merged_away(len(sources))
        logger.info(
            "prediction log: %d parts merged into %s (%d rows)",
            len(sources),
            merged,
            sum(bounds[2] for _, _, bounds in inside),
        )
        return final

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

    def _roll_up_told(self) -> None:
        """:meth:`roll_up` on the flusher: a failure is told once, and the parts stay as they
        are (a full disk: the window is tried again after the next flush)."""
        try:
            self.roll_up()
        except Exception as exc:
            self.rollup_trouble.failed(exc, "the parts stay as they are")
        else:
            self.rollup_trouble.worked()
