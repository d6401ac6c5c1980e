"""The one place that records measurements: in-process counters of RPCs by method and status
code, with their latency sums, that the tests and the demo read. An exporter (Prometheus,
OpenTelemetry) reads the same calls without touching the call sites."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass
class _Latency:
    count: int = 0
    total_seconds: float = 0.0
    max_seconds: float = 0.0


@dataclass
class Recorder:
    """Counts RPCs by method and status code, and sums their latency."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    _latency: defaultdict[str, _Latency] = field(default_factory=lambda: defaultdict(_Latency))

    def rpc(self, method: str, code: str, seconds: float) -> None:
        with self._lock:
            self._calls[(method, code)] += 1
            latency = self._latency[method]
            latency.count += 1
            latency.total_seconds += seconds
            latency.max_seconds = max(latency.max_seconds, seconds)

    def calls(self, method: str, code: str | None = None) -> int:
        with self._lock:
            return sum(n for (m, c), n in self._calls.items() if m == method and code in (None, c))
