"""A reload that removes an endpoint while a Predict still waits for it: the call is answered
with the other votes and the removed server reported missing (UNAVAILABLE), whichever transport.
Before, the removed client's closing cancelled the call's future for it and the call itself
ended in CancelledError: over gRPC the caller got no status at all, only its own deadline."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from coordinator.helpers import endpoint, write_config
from coordinator.lying_model_server import LyingModelServer
from coordinator.recording_model_server import RecordingModelServer

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator.coordinator import AsyncCoordinator
from xylen_coordinator.endpoints import MissingReason
from xylen_coordinator.results import EnsembleResult

ROW = [pb.PredictInput(features=types_pb2.FeatureVector(values=[0.0] * 3))]


@pytest.mark.parametrize("use_stream", [False, True], ids=["unary", "stream"])
def test_an_endpoint_removed_while_a_call_waits_for_it_is_a_missing_vote(
    tmp_path: Path, use_stream: bool
) -> None:
    fast, slow = RecordingModelServer("fast", 0.8), LyingModelServer("slow", 0.6)
    slow.delay = 2.5  # answers after the removed client is closed (2 x deadline_ms + 1 s)
    try:
        endpoints = [endpoint("fast", fast.port, 1.0), endpoint("slow", slow.port, 1.0)]
        transport = {"use_stream": use_stream}
        before = write_config(tmp_path / "before.yaml", endpoints, deadline_ms=100,
                              transport=transport)  # fmt: skip
        after = write_config(tmp_path / "after.yaml", endpoints[:1], deadline_ms=100,
                             transport=transport)  # fmt: skip

        async def run() -> EnsembleResult:
            async with AsyncCoordinator(before) as coordinator:
                assert await coordinator.wait_serving(timeout=10)
                call = asyncio.ensure_future(coordinator.predict(ROW, timeout=5.0))
                await asyncio.sleep(0.2)
                await coordinator.reload(after)
                result = await call
                again = await coordinator.predict(ROW)  # and it keeps serving
                assert [vote.server_name for vote in again.decision.votes] == ["fast"]
                return result

        result = asyncio.run(run())
    finally:
        fast.close()
        slow.close()
    assert [vote.server_name for vote in result.decision.votes] == ["fast"]
    (missing,) = result.missing
    assert missing.server_name == "slow"
    assert missing.reason is MissingReason.UNAVAILABLE
