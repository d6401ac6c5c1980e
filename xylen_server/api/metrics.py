"""The one place that records measurements of the RPCs: calls counted by method and final
status code, read by the tests. An exporter (Prometheus, OpenTelemetry) reads the same calls
without touching the call sites."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Recorder:
    """Counts RPCs by method and status code."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _calls: Counter[tuple[str, str]] = field(default_factory=Counter)

    def rpc(self, method: str, code: str) -> None:
        with self._lock:
            self._calls[(method, code)] += 1

    def calls(self, method: str, code: str | None = None) -> int:
        with self._lock:
            return sum(n for (m, c), n in self._calls.items() if m == method and code in (None, c))
