"""A bounded load on the ensemble: ``calls`` Predict calls at ``concurrency`` in flight (and at
most ``max_seconds``), each answer recorded as latency, voters and missing votes, each error by
status code. Shared by the load and fault tests and by ``bench/bench_fleet.py``.

A *shed* is a refusal for load (RESOURCE_EXHAUSTED): of the ensemble call itself, or of one
server's vote (a missing vote whose message starts with the code).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import ensemble_service_pb2_grpc as epb_grpc
from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator import AsyncCoordinator
from xylen_server.errors import XylenError


@dataclass(frozen=True)
class Outcome:
    """One answered ensemble call."""

    prediction_id: str
    voters: tuple[str, ...]
    missing: tuple[tuple[str, str, str], ...]
    """(server, reason, message) of each missing vote."""


Call = Callable[[], Awaitable[Outcome]]
"""One ensemble call: an :class:`Outcome`, or raises :class:`CallError`."""


class CallError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class LoadReport:
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.outcomes)

    @property
    def calls(self) -> int:
        return self.answered + sum(self.errors.values())

    @property
    def sheds(self) -> int:
        votes = sum(
            1
            for o in self.outcomes
            for _, _, message in o.missing
            if message.startswith("RESOURCE_EXHAUSTED")
        )
        return self.errors["RESOURCE_EXHAUSTED"] + votes

    def missing(self) -> Counter[tuple[str, str]]:
        """Missing votes by (server, reason)."""
        return Counter((s, r) for o in self.outcomes for s, r, _ in o.missing)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")

    def line(self) -> str:
        rate = self.calls / self.seconds if self.seconds else 0.0
        return (
            f"c={self.concurrency:<4} calls={self.calls:<6} answered={self.answered:<6} "
            f"errors={sum(self.errors.values()):<4} sheds={self.sheds:<4} "
            f"{dict(self.errors) if self.errors else ''} "
            f"p50={self.percentile_ms(50):7.1f}ms p99={self.percentile_ms(99):7.1f}ms "
            f"rate={rate:7.1f}/s"
        )


async def run_load(
    call: Call,
    concurrency: int,
    calls: int,
    max_seconds: float = 60.0,
    on_answer: Callable[[Outcome], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
) -> LoadReport:
    """``calls`` calls (fewer if ``max_seconds`` runs out or ``stop`` is set) with
    ``concurrency`` in flight."""
    report = LoadReport(concurrency)
    started = time.perf_counter()
    stop_at = started + max_seconds
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while (
            issued < calls
            and time.perf_counter() < stop_at
            and not (stop is not None and stop.is_set())
        ):
            issued += 1
            t0 = time.perf_counter()
            try:
                outcome = await call()
            except CallError as error:
                report.errors[error.code] += 1
                continue
            report.latencies.append(time.perf_counter() - t0)
            report.outcomes.append(outcome)
            if on_answer is not None:
                await on_answer(outcome)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    report.seconds = time.perf_counter() - started
    return report


def library_call(coordinator: AsyncCoordinator, inputs: Sequence[pb.PredictInput]) -> Call:
    async def call() -> Outcome:
        try:
            result = await coordinator.predict(list(inputs))
        except XylenError as error:
            raise CallError(error.code.name, error.message) from None
        except Exception as error:  # a bug: counted as the INTERNAL the servicer would answer
            raise CallError("INTERNAL", f"{type(error).__name__}: {error}") from None
        return Outcome(
            result.decision.prediction_id,
            result.voters,
            tuple((m.server_name, m.reason.value, m.message) for m in result.missing),
        )

    return call


def grpc_call(
    stub: epb_grpc.EnsembleServiceStub, inputs: Sequence[pb.PredictInput], timeout: float
) -> Call:
    request = epb.EnsembleServicePredictRequest(inputs=list(inputs))

    async def call() -> Outcome:
        try:
            response = await stub.Predict(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise CallError(error.code().name, error.details() or "") from None
        prediction = response.predictions[0]
        return Outcome(
            prediction.prediction_id,
            tuple(v.server_name for v in prediction.votes),
            tuple(
                (m.server_name, epb.MissingReason.Name(m.reason)[len("MISSING_REASON_") :],
                 m.message)
                for m in response.missing_votes
            ),
        )  # fmt: skip

    return call
