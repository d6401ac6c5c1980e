"""What happened to each endpoint's votes: counted here, read by GetEnsembleInfo and the tests.

One :class:`Metrics` per coordinator. The fan-out counts votes and missing votes (by reason, and
rejected votes by what was wrong with them), outlier detection counts ejections and rejoins. A
rejected vote is also logged, at most once per :data:`LOG_INTERVAL_SECONDS` per server and
reason with the count since the last line, so that a lying server cannot fill the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

#: Shortest interval between two log lines about the same server's rejected votes.
LOG_INTERVAL_SECONDS = 10.0


@dataclass(frozen=True)
class EndpointCounts:
    """Counters of one endpoint since the coordinator started."""

    votes: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    """Missing votes by MissingReason value (``REJECTED``, ``EJECTED``, ...)."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Rejected votes by what was wrong (``PROBABILITY_OUT_OF_RANGE``, ...)."""
    ejections: int = 0
    rejoins: int = 0
    feedback_not_forwarded: dict[str, int] = field(default_factory=dict)
    """Outcomes not forwarded to this endpoint, by reason (``HORIZON_MISMATCH``, ...)."""


class Metrics:
    """Counters by endpoint name (thread-safe: the synchronous client reads them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._votes: Counter[str] = Counter()
        self._missing: Counter[tuple[str, str]] = Counter()
        self._rejected: Counter[tuple[str, str]] = Counter()
        self._ejections: Counter[str] = Counter()
        self._rejoins: Counter[str] = Counter()
        self._not_forwarded: Counter[tuple[str, str]] = Counter()
        self._last_log: dict[tuple[str, str], tuple[float, int]] = {}
        self._outbox_failures: Counter[str] = Counter()
        self._pruned: Counter[str] = Counter()
        self._refused: Counter[tuple[str, str]] = Counter()
        self._abandoned: Counter[str] = Counter()

    def vote(self, name: str) -> None:
        with self._lock:
            self._votes[name] += 1

    def missing(self, name: str, reason: str, error_reason: str = "", message: str = "") -> None:
        """Count a missing vote; a rejected one (reason ``REJECTED``) is logged too."""
        with self._lock:
            self._missing[(name, reason)] += 1
            if reason != "REJECTED":
                return
            self._rejected[(name, error_reason)] += 1
            key = (name, error_reason)
            now = time.monotonic()
            last, skipped = self._last_log.get(key, (-LOG_INTERVAL_SECONDS, 0))
            if now - last < LOG_INTERVAL_SECONDS:
                self._last_log[key] = (last, skipped + 1)
                return
            self._last_log[key] = (now, 0)
        more = f" ({skipped} more since the last report)" if skipped else ""
        logger.warning("vote of %s rejected, %s: %s%s", name, error_reason, message, more)

    def ejected(self, name: str) -> None:
        with self._lock:
            self._ejections[name] += 1

    def rejoined(self, name: str) -> None:
        with self._lock:
            self._rejoins[name] += 1

    def not_forwarded(self, name: str, reason: str) -> None:
        """Count an outcome not forwarded to ``name`` (its label horizon is not the outcome's)."""
        with self._lock:
            self._not_forwarded[(name, reason)] += 1

    def outbox_failed(self, part: str) -> None:
        """Count a failed use of the outbox (a full disk) by ``part``: ``prediction_log`` (the
        write-behind of the ensemble's predictions), ``feedback_forwarding`` (a pass of the
        forwarder, which records each delivery's result) or ``retention_sweep`` (a sweep of
        rows older than the retention)."""
        with self._lock:
            self._outbox_failures[part] += 1

    def outbox_failures(self) -> dict[str, int]:
        """Failed uses of the outbox by part since the coordinator started."""
        with self._lock:
            return dict(self._outbox_failures)

    def pruned(self, table: str, rows: int) -> None:
        """Count ``rows`` deleted from the outbox's ``table`` by the retention sweep."""
        with self._lock:
            self._pruned[table] += rows

    def pruned_rows(self) -> dict[str, int]:
        """Rows the retention sweep deleted, by outbox table, since the coordinator started."""
        with self._lock:
            return dict(self._pruned)

    def refused(self, name: str, code: str) -> None:
        """Count an outcome ``name`` refused for good with status ``code`` (INVALID_ARGUMENT,
        ...): its delivery is marked failed, not retried."""
        with self._lock:
            self._refused[(name, code)] += 1

    def refusals(self) -> dict[tuple[str, str], int]:
        """Outcomes refused for good by (server, status code name) since the start."""
        with self._lock:
            return dict(self._refused)

    def abandoned(self, name: str, deliveries: int) -> None:
        """Count ``deliveries`` to ``name`` abandoned: it was absent from the configuration
        for longer than the outbox's retention."""
        with self._lock:
            self._abandoned[name] += deliveries

    def abandoned_deliveries(self) -> dict[str, int]:
        """Deliveries abandoned by server since the start."""
        with self._lock:
            return dict(self._abandoned)

    def counts(self, name: str) -> EndpointCounts:
        with self._lock:
            return EndpointCounts(
                votes=self._votes[name],
                missing={r: n for (e, r), n in self._missing.items() if e == name},
                rejected={r: n for (e, r), n in self._rejected.items() if e == name},
                ejections=self._ejections[name],
                rejoins=self._rejoins[name],
                feedback_not_forwarded={
                    r: n for (e, r), n in self._not_forwarded.items() if e == name
                },
            )
