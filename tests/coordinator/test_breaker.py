"""Outlier detection's rules: consecutive failures eject, the period doubles per ejection in a
row up to its cap, a passed probe lets the server back on probation, an answer clears its
record, never more than ``max_ejected_fraction`` of the endpoints out at once. The rules are
checked on :class:`Breaker` with a scripted probe, and the cap on real servers that answer
too late."""

from __future__ import annotations

import asyncio
from pathlib import Path

from coordinator.helpers import endpoint, write_config
from coordinator.lying_model_server import LyingModelServer

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator import AsyncCoordinator, MissingReason
from xylen_coordinator.breaker import Breaker
from xylen_coordinator.config import OutlierDetection
from xylen_server.errors import Unavailable

SETTINGS = OutlierDetection(
    consecutive_failures=2, base_ejection_seconds=0.05, max_ejection_seconds=0.2,
    probe_timeout_ms=50,
)  # fmt: skip


def test_ejection_probation_doubling_and_cap() -> None:
    async def scenario() -> None:
        healthy = False
        probes = 0

        async def probe(timeout: float) -> str | None:
            nonlocal probes
            probes += 1
            return None if healthy else "DEADLINE_EXCEEDED"

        events: list[str] = []
        breaker = Breaker("s", SETTINGS, probe, lambda: events.append("eject"),
                          lambda: events.append("rejoin"))  # fmt: skip
        assert not breaker.failure("timeout", may_eject=True)
        breaker.success()  # an answer in between: the count starts again
        assert not breaker.failure("timeout", may_eject=True)
        assert not breaker.failure("timeout", may_eject=False)  # enough others are out
        assert breaker.failure("timeout", may_eject=True)
        assert breaker.ejected and events == ["eject"]
        assert not breaker.failure("late answer of a call in flight", may_eject=True)
        await asyncio.sleep(0.4)  # probes fail: 0.05 -> 0.1 -> 0.2 -> 0.2 (the cap)
        assert breaker.ejected and probes >= 2 and breaker.streak >= 3
        healthy = True
        await asyncio.sleep(0.3)
        assert not breaker.ejected and events == ["eject", "rejoin"]
        # On probation: one failure ejects it again, for the doubled period (capped).
        assert breaker.failure("timeout", may_eject=True)
        assert breaker.ejected_until is not None
        await asyncio.sleep(0.3)
        assert not breaker.ejected
        breaker.success()  # an answer clears the record
        assert breaker.streak == 0 and breaker.failures == 0
        assert not breaker.failure("timeout", may_eject=True)
        await breaker.close()

    asyncio.run(scenario())


def test_disabled_never_ejects() -> None:
    async def scenario() -> None:
        async def probe(timeout: float) -> str | None:
            return None

        breaker = Breaker("s", OutlierDetection(enabled=False), probe)
        assert not any(breaker.failure("timeout", may_eject=True) for _ in range(10))
        assert not breaker.ejected

    asyncio.run(scenario())


def test_at_most_half_the_endpoints_are_ejected(tmp_path: Path) -> None:
    """Three of four servers answer after the deadline: two are ejected, the third is still
    asked (and misses the deadline), so the coordinator's own slowness cannot empty it."""
    servers = [LyingModelServer(f"m{i}") for i in range(4)]
    try:
        for server in servers[1:]:
            server.delay = 3.0
        config = write_config(
            tmp_path / "config.yaml",
            [endpoint(f"m{i}", s.port, 1.0) for i, s in enumerate(servers)],
            deadline_ms=400,
            quorum={"min_weight_fraction": 0.25},
            outlier_detection={"consecutive_failures": 1, "base_ejection_seconds": 30},
        )
        inputs = [pb.PredictInput(features=types_pb2.FeatureVector(values=[0.0]))]

        async def scenario() -> list[list[MissingReason]]:
            async with AsyncCoordinator(config) as coordinator:
                assert await coordinator.wait_serving(timeout=10)
                return [
                    [m.reason for m in (await coordinator.predict(inputs)).missing]
                    for _ in range(3)
                ]

        first, second, third = asyncio.run(scenario())
        assert first == [MissingReason.DEADLINE_EXCEEDED] * 3
        for later in (second, third):
            assert sorted(later) == sorted(
                [MissingReason.EJECTED, MissingReason.EJECTED, MissingReason.DEADLINE_EXCEEDED]
            )
    finally:
        for server in servers:
            server.close()


def test_nobody_is_ejected_when_no_server_answered(tmp_path: Path) -> None:
    """When every asked server misses the deadline, the cause is as likely the coordinator
    (overloaded) or the deadline: no server is an outlier and none is ejected."""
    servers = [LyingModelServer(f"m{i}") for i in range(2)]
    try:
        for server in servers:
            server.delay = 3.0
        config = write_config(
            tmp_path / "config.yaml",
            [endpoint(f"m{i}", s.port, 1.0) for i, s in enumerate(servers)],
            deadline_ms=200,
            outlier_detection={"consecutive_failures": 1},
        )
        inputs = [pb.PredictInput(features=types_pb2.FeatureVector(values=[0.0]))]

        async def scenario() -> tuple[list[str], list[bool]]:
            async with AsyncCoordinator(config) as coordinator:
                assert await coordinator.wait_serving(timeout=10)
                messages = []
                for _ in range(3):
                    try:
                        await coordinator.predict(inputs)
                    except Unavailable as error:
                        messages.append(error.message)
                return messages, [e.ejected for e in coordinator.endpoints()]

        messages, ejected = asyncio.run(scenario())
        assert len(messages) == 3 and ejected == [False, False]
        for message in messages:
            assert message.count("DEADLINE_EXCEEDED") == 2 and "EJECTED" not in message
    finally:
        for server in servers:
            server.close()
