"""A repeating failure told once: what the model server and the coordinator log while a disk is
full (or a peer is down) and their background loops retry.

A loop that retries a failing write every few seconds and logs each failure with its traceback
fills the log for as long as the disk stays full (the coordinator's outbox once wrote 885 lines
in 10 s; the server's prediction-log flusher a traceback every interval). :class:`Trouble` is
the one rule both follow: one line when a part begins to fail, one line when it works again,
however many attempts failed in between; every failed attempt counted (the caller's counter:
``xylen_storage_failures_total{part}`` in the model server,
``xylen_coordinator_outbox_failures_total{part}`` in the coordinator); the retries unchanged.
A failure that is not the storage's (a bug) gets its traceback, once, when it begins.

Import-light (the standard library only): the coordinator imports it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable

SHOWN_ERROR_CHARS = 200
"""Characters of an exception's text quoted in a log line."""


def storage_error(exc: BaseException) -> bool:
    """A failure of the disk or the database (full, read-only, I/O), not of this code."""
    return isinstance(exc, (OSError, sqlite3.Error))


def describe(exc: BaseException | str) -> str:
    """``Type: text`` of an exception (or a text as it is), on one bounded line."""
    if isinstance(exc, str):
        return " ".join(exc.split())[:SHOWN_ERROR_CHARS]
    text = " ".join(str(exc).split())[:SHOWN_ERROR_CHARS]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Trouble:
    """The failures of one part's use of something (its disk, its outbox, a peer), told once.

    ``failed`` for every failed attempt, ``worked`` for every attempt that worked; the log says
    ``<subject>: <what> failed (<error>); <retry>; one line more when it works again`` when the
    failures begin and ``<subject>: <what> works again after N failed attempts in Xs`` when they
    end (``subject`` defaults to ``part`` with spaces). ``count`` (if given) is called with
    ``part`` at every failed attempt. Thread-safe: ``failed`` and ``worked`` may be called from
    any thread."""

    def __init__(
        self,
        part: str,
        what: str,
        log: logging.Logger,
        count: Callable[[str], None] | None = None,
        *,
        subject: str | None = None,
        level: int = logging.WARNING,
    ) -> None:
        self.part = part
        self.what = what
        self.log = log
        self.count = count
        self.subject = subject if subject is not None else part.replace("_", " ")
        self.level = level
        self._lock = threading.Lock()
        self.since: float | None = None
        """When the failures began (monotonic); None while the part works."""
        self.attempts = 0
        """Failed attempts since then."""

    def failed(self, error: BaseException | str, retry: str) -> None:
        """One failed attempt; ``retry`` says what happens to the work meanwhile. A text
        ``error`` (a peer's answer) never carries a traceback."""
        if self.count is not None:
            self.count(self.part)
        with self._lock:
            self.attempts += 1
            if self.since is not None:
                return
            self.since = time.monotonic()
        bug = error if isinstance(error, BaseException) and not storage_error(error) else None
        self.log.log(
            self.level,
            "%s: %s failed (%s); %s; one line more when it works again",
            self.subject,
            self.what,
            describe(error),
            retry,
            exc_info=bug,
        )

    def worked(self) -> None:
        """An attempt that worked: the end of the failures, if any."""
        if self.since is None:  # the common case, without the lock
            return
        with self._lock:
            since, attempts = self.since, self.attempts
            if since is None:
                return
            self.since, self.attempts = None, 0
        self.log.log(
            self.level,
            "%s: %s works again after %d failed attempts in %.1fs",
            self.subject,
            self.what,
            attempts,
            time.monotonic() - since,
        )

    @property
    def failing(self) -> bool:
        """True between a failure and the next attempt that worked."""
        return self.since is not None


class FailureCounts:
    """Failed attempts by part, counted from any thread and read at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def count(self, part: str) -> None:
        with self._lock:
            self._counts[part] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
