"""A hot swap's CPU kept to a share of one core (``MODEL_LOAD_CPU_SHARE``).

Loading a new version beside the serving one (checks, the session build, the parity run, the
warm-up, the history's file work) costs the server ~45 ms of CPU for a 500-tree model. Run flat
out, back-to-back swaps take most of a core from a 2-core machine that is already serving, and
Predict's p99 pays for it during every step (``python -m bench swaps`` lays the slowest calls
beside the steps: no single step holds them, they follow the CPU). :class:`CpuShare` trades the
swap's duration for serving latency: the threads doing a load charge their own CPU time
(``time.thread_time``) to it, and at every :meth:`~CpuShare.pace` the caller sleeps until the
CPU charged is at most ``share`` x the time since the load began. A step is not cut, so the
CPU can run ahead of the share by at most the longest stretch between two paces (the session
build, ~13 ms of CPU, is the longest: onnxruntime builds it in one call).

Only a hot swap is paced: the start-up load has nothing to yield to.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class CpuShare:
    """The CPU budget of one load: ``share`` of one core (1: never sleeps, only counts)."""

    def __init__(self, share: float) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"a CPU share lies in (0, 1], got {share!r}")
        self.share = share
        self.started = time.perf_counter()
        self.used = 0.0
        """CPU seconds charged so far by the threads working for the load."""
        self.slept = 0.0
        """Seconds :meth:`pace` slept so far."""
        self._lock = threading.Lock()
        self._marks = threading.local()

    def enter(self) -> None:
        """The calling thread starts working for the load: its CPU from now on is charged."""
        self._marks.at = time.thread_time()

    def charge(self) -> None:
        """Charge the calling thread's CPU since it entered or last charged (nothing for a
        thread that never entered)."""
        now = time.thread_time()
        mark = getattr(self._marks, "at", None)
        self._marks.at = now
        if mark is not None:
            with self._lock:
                self.used += now - mark

    def pace(self) -> None:
        """Charge the calling thread's CPU, then sleep until the load's CPU is within
        ``share`` x the time since it began."""
        self.charge()
        if self.share >= 1.0:
            return
        with self._lock:
            wait = self.started + self.used / self.share - time.perf_counter()
        if wait > 0:
            # The mark stays: what the thread's CPU does around the sleep (going to sleep,
            # waking up, a garbage collection landing there) is the load's too.
            time.sleep(wait)
            with self._lock:
                self.slept += wait

    @contextmanager
    def working(self) -> Iterator[None]:
        """Charge the calling thread's CPU for the block, then pace."""
        self.enter()
        try:
            yield
        finally:
            self.pace()

    def summary(self) -> str:
        """``CPU 45 ms in 190 ms (share 0.25, slept 140 ms)``."""
        with self._lock:
            used, slept = self.used, self.slept
        elapsed = time.perf_counter() - self.started
        return (
            f"CPU {used * 1e3:.0f} ms in {elapsed * 1e3:.0f} ms (share {self.share:g}, "
            f"slept {slept * 1e3:.0f} ms)"
        )
