"""The admission queue's bookkeeping at the edges of a wait: a call whose deadline passes (or
that is cancelled) in the same loop turn as the slot it waited for is freed. The interceptor
and asyncio are real; the context stands in for grpc's only in what admission reads from it
(its time remaining, whether it was cancelled)."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from xylen_server.api.admission import AdmissionInterceptor
from xylen_server.api.metrics import Recorder
from xylen_server.errors import DeadlineExceeded
from xylen_server.settings import Settings


class _Context:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    def cancelled(self) -> bool:
        return False


def _admission(running: int, queued: int) -> AdmissionInterceptor:
    settings = dataclasses.replace(Settings(), max_concurrent_rpcs=running, max_queued_rpcs=queued)
    return AdmissionInterceptor(settings, Recorder())


def test_a_deadline_passing_as_the_slot_is_freed_is_deadline_exceeded_not_internal() -> None:
    """wait_for cancels the waiting call's future and returns one loop turn later; a call
    finishing in that turn took the cancelled future off the queue, and the waiting call then
    failed removing it again: ValueError, answered INTERNAL, the expiry uncounted. Fails
    before, passes after."""

    async def main() -> None:
        admission = _admission(running=1, queued=4)
        await admission.acquire(10, _Context(None))  # one call runs
        waiting = asyncio.create_task(admission.acquire(20, _Context(0.05)))
        while not admission._waiting or not admission._waiting[0].cancelled():
            await asyncio.sleep(0)  # until wait_for's timeout has cancelled the wait
        admission.release(10)  # the running call ends in that very turn
        with pytest.raises(DeadlineExceeded):
            await waiting
        assert (admission.running, admission.queued, admission.inflight_bytes) == (0, 0, 0)
        assert admission.recorder.events("expired") == 1
        await admission.acquire(5, _Context(None))  # the freed slot is there for the next
        assert admission.running == 1

    asyncio.run(main())


@pytest.mark.parametrize("seed", range(8))
def test_slots_and_bytes_add_up_after_any_mix_of_finishing_expiring_and_cancelled_calls(
    seed: int,
) -> None:
    """Many calls through two slots and a queue of three, with deadlines from already gone to
    long, some cancelled while they wait: every call either ran or was refused with a project
    error (never another exception), never more than two ran at once, and afterwards nothing
    is held."""
    rng = random.Random(seed)

    async def main() -> None:
        admission = _admission(running=2, queued=3)
        outcomes: list[str] = []
        now_running = 0
        most = 0

        async def call(size: int, remaining: float, work: float) -> None:
            nonlocal now_running, most
            try:
                await admission.acquire(size, _Context(remaining))
            except DeadlineExceeded:
                outcomes.append("expired")
                return
            except asyncio.CancelledError:
                outcomes.append("cancelled")
                return
            except Exception as exc:
                outcomes.append(type(exc).__name__ + getattr(exc, "reason", ""))
                return
            now_running += 1
            most = max(most, now_running)
            try:
                await asyncio.sleep(work)
            finally:
                now_running -= 1
                admission.release(size)
            outcomes.append("ran")

        tasks = []
        for _ in range(120):
            remaining = rng.choice([0.0, 0.001, 0.003, 0.005, 0.01, 0.05])
            task = asyncio.create_task(
                call(rng.randrange(1, 1000), remaining, rng.choice([0, 0.001, 0.002, 0.004]))
            )
            tasks.append(task)
            if rng.random() < 0.5:
                await asyncio.sleep(rng.choice([0, 0.001]))
            if rng.random() < 0.1:
                rng.choice(tasks).cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        unexpected = [o for o in outcomes if o not in {"ran", "expired", "cancelled"}]
        assert set(unexpected) <= {"ResourceExhaustedOVERLOADED"}, unexpected
        assert most <= 2
        assert (admission.running, admission.queued, admission.inflight_bytes) == (0, 0, 0)

    asyncio.run(main())
