"""Outlier detection for one endpoint: eject a server that stops answering, probe it, let it
back in when it is healthy.

A :class:`Breaker` counts the fan-out's timeouts and connection failures in a row. At
``consecutive_failures`` it ejects the server: the fan-out does not ask it (a missing vote with
reason EJECTED, answered at once) for the ejection period, which doubles with each ejection in a
row up to a cap. When the period ends a grpc.health.v1 Check probes the server; SERVING within
the probe's deadline lets it rejoin on probation (one more failure ejects it again, with the
doubled period; an answer clears its record), anything else ejects it again.

So a hung server (SIGSTOP) costs the calls in flight one deadline, and after that nothing until
it answers its probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from xylen_coordinator.config import OutlierDetection

logger = logging.getLogger(__name__)

Probe = Callable[[float], Awaitable[str | None]]
"""Health probe with a timeout in seconds: None when healthy, else why not."""


class Breaker:
    """Consecutive-failure ejection of one endpoint, with health-probed rejoin."""

    def __init__(
        self,
        name: str,
        settings: OutlierDetection,
        probe: Probe,
        on_eject: Callable[[], None] = lambda: None,
        on_rejoin: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._probe = probe
        self._on_eject = on_eject
        self._on_rejoin = on_rejoin
        self.failures = 0
        """Timeouts or connection failures in a row."""
        self.streak = 0
        """Ejections in a row (no answer in between): the period doubles with each."""
        self.ejected_until: float | None = None
        """``time.monotonic()`` when the ejection period ends (None: not ejected)."""
        self.last_failure = ""
        self._task: asyncio.Task[None] | None = None

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    def describe(self) -> str:
        """Why the endpoint is ejected, for the missing vote's message."""
        if self.ejected_until is None:
            return "not ejected"
        left = max(0.0, self.ejected_until - time.monotonic())
        return (
            f"ejected after {self.settings.consecutive_failures} consecutive failures "
            f"(last: {self.last_failure}); health probe in {left:.1f}s"
        )

    def success(self) -> None:
        """The server answered (even with an error status or an untrusted vote)."""
        self.failures = 0
        if not self.ejected:
            self.streak = 0

    def failure(self, detail: str, may_eject: bool) -> bool:
        """A timeout or connection failure; True when it ejects the server. ``may_eject`` is
        False when enough other endpoints are ejected already."""
        if self.ejected:
            return False  # calls that were in flight when it was ejected
        self.failures += 1
        self.last_failure = detail[:200]
        settings = self.settings
        if not settings.enabled or self.failures < settings.consecutive_failures or not may_eject:
            return False
        self._eject()
        return True

    def _period(self) -> float:
        settings = self.settings
        # The doubling stops where it can no longer matter: 2**streak past 2**1023 raised
        # OverflowError (after ~1,000 failed probes, ~8.5 hours down at the defaults), which
        # ended the probe loop and left the server ejected for good.
        doubling = 2.0 ** min(self.streak, 64)
        return float(min(settings.max_ejection_seconds, settings.base_ejection_seconds * doubling))

    def _eject(self) -> None:
        period = self._period()
        self.streak += 1
        self.ejected_until = time.monotonic() + period
        self._on_eject()
        logger.warning(
            "%s ejected for %.1fs after %d consecutive failures (last: %s)",
            self.name,
            period,
            self.failures,
            self.last_failure,
        )
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._probe_loop(), name=f"probe-{self.name}")

    async def _probe_loop(self) -> None:
        while self.ejected_until is not None:
            await asyncio.sleep(max(0.0, self.ejected_until - time.monotonic()))
            try:
                why = await self._probe(self.settings.probe_timeout_ms / 1000)
            except Exception as error:  # a probe must never end the loop
                why = f"{type(error).__name__}: {error}"
            if why is None:
                # On probation: the next failure ejects it again, an answer clears the streak.
                self.ejected_until = None
                self.failures = max(0, self.settings.consecutive_failures - 1)
                self._on_rejoin()
                logger.warning("%s rejoined: its health probe answered SERVING", self.name)
                return
            period = self._period()
            self.streak += 1
            self.ejected_until = time.monotonic() + period
            logger.info("%s stays ejected for %.1fs: health probe %s", self.name, period, why)

    def reset(self) -> None:
        """Back in at once (outlier detection switched off by a reload)."""
        if self.ejected:
            self._on_rejoin()
        self.ejected_until = None
        self.failures = 0
        self.streak = 0
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
