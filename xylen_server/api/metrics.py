"""The one place that records measurements of the RPCs: calls counted by method and final
status code, read by the tests. An exporter (Prometheus, OpenTelemetry) reads the same calls
without touching the call sites."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Recorder:
    """Counts RPCs by method and status code, and named events (see :meth:`event`)."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    _events: Counter[str] = field(default_factory=Counter)

    def event(self, name: str) -> None:
        """Count one event of ``name``: ``undecodable`` request bytes, a call ``shed`` at
        admission, work dropped unrun because its deadline passed (``expired``) or its call
        was ``cancelled``."""
        with self._lock:
            self._events[name] += 1

    def events(self, name: str) -> int:
        with self._lock:
            return self._events[name]

    def rpc(self, method: str, code: str) -> None:
        with self._lock:
            self._calls[(method, code)] += 1

    def calls(self, method: str, code: str | None = None) -> int:
        with self._lock:
            return sum(n for (m, c), n in self._calls.items() if m == method and code in (None, c))
