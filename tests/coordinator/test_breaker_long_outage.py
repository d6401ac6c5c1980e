"""A server down for a long time is still probed and let back in: the ejection period's
doubling must not overflow after many failed probes in a row. Real :class:`Breaker` and
asyncio, a scripted probe, tiny periods so a thousand-odd probes take well under a second."""

from __future__ import annotations

import asyncio

from xylen_coordinator.breaker import Breaker
from xylen_coordinator.config import OutlierDetection


def test_a_server_back_after_over_a_thousand_failed_probes_rejoins() -> None:
    """``base * 2**streak`` raised OverflowError once the streak passed 1023 failed probes
    (~8.5 hours down at the default 30 s cap): the probe loop died and the server stayed
    ejected until the coordinator restarted. Fails before, passes after."""
    settings = OutlierDetection(
        consecutive_failures=1,
        base_ejection_seconds=0.00001,
        max_ejection_seconds=0.00002,
        probe_timeout_ms=1,
    )

    async def scenario() -> None:
        healthy = False
        probes = 0
        rejoined = asyncio.Event()

        async def probe(timeout: float) -> str | None:
            nonlocal probes
            probes += 1
            await asyncio.sleep(0)
            return None if healthy else "UNAVAILABLE"

        breaker = Breaker("s", settings, probe, on_rejoin=rejoined.set)
        assert breaker.failure("connection refused", may_eject=True)
        task = breaker._task
        assert task is not None
        while probes < 1100 and not task.done():
            await asyncio.sleep(0.0001)
        assert not task.done(), task.exception()  # still probing after 1100 failures
        assert breaker.ejected and breaker.streak > 1024
        assert breaker._period() == settings.max_ejection_seconds
        healthy = True
        await asyncio.wait_for(rejoined.wait(), 30)
        assert not breaker.ejected
        await breaker.close()

    asyncio.run(scenario())
