"""What a server's GetModelInfo says is checked before the ensemble uses it, and waiting for it
stays within the call's budget: real servers on loopback that report what the test tells them."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from coordinator.helpers import endpoint, write_config
from coordinator.lying_model_server import LyingModelServer

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator import Coordinator
from xylen_server.signals import Signal

ROW = [pb.PredictInput(features=types_pb2.FeatureVector(values=[0.0] * 3))]


def _wait_for_info(coordinator: Coordinator, servers: list[LyingModelServer]) -> None:
    deadline = time.monotonic() + 10
    while not all(server.info_calls for server in servers):
        assert time.monotonic() < deadline, "GetModelInfo was never called"
        time.sleep(0.05)
    time.sleep(0.3)  # the answers reach the coordinator's loop


@pytest.mark.parametrize("reported", [(1e9, 0.4), (math.nan, 0.4), (0.6, -0.2), (1.5, 0.5)])
def test_thresholds_that_are_not_probabilities_in_order_are_not_used(
    tmp_path: Path, reported: tuple[float, float]
) -> None:
    # Both vote 0.9. One reports thresholds (0.6, 0.4); the other reports garbage, which counts
    # as unknown: the configured thresholds (0.55, 0.45) stand in for it. Before, buy=1e9 made
    # the ensemble's threshold 5e8 and the unanimous 0.9 was HOLD.
    honest, liar = LyingModelServer("honest", 0.9), LyingModelServer("liar", 0.9)
    honest.buy_threshold, honest.sell_threshold = 0.6, 0.4
    liar.buy_threshold, liar.sell_threshold = reported
    try:
        config = write_config(
            tmp_path / "config.yaml",
            [endpoint("honest", honest.port, 1.0), endpoint("liar", liar.port, 1.0)],
            thresholds={"buy": 0.55, "sell": 0.45, "source": "members"},
        )
        with Coordinator(config) as coordinator:
            assert coordinator.wait_serving(timeout=10)
            _wait_for_info(coordinator, [honest, liar])
            row = coordinator.predict(ROW).decision
    finally:
        honest.close()
        liar.close()
    assert row.buy_threshold == pytest.approx((0.6 + 0.55) / 2)
    assert row.sell_threshold == pytest.approx((0.4 + 0.45) / 2)
    assert row.signal is Signal.BUY


def test_waiting_for_a_slow_model_info_stays_within_the_budget(tmp_path: Path) -> None:
    # `slow` answers Predict near the end of a 1 s budget and GetModelInfo only after 10 s.
    # The coordinator waits for model info in flight, but only for what is left of the
    # budget: before, it waited a whole budget more (about 1.9 s in all).
    fast, slow = LyingModelServer("fast", 0.7), LyingModelServer("slow", 0.7)
    slow.info_delay = 10.0
    try:
        endpoints = [endpoint("fast", fast.port, 1.0), endpoint("slow", slow.port, 1.0)]
        config = write_config(tmp_path / "config.yaml", endpoints)
        with Coordinator(config) as coordinator:
            assert coordinator.wait_serving(timeout=10)
            slow.delay = 0.8
            started = time.monotonic()
            result = coordinator.predict(ROW, timeout=1.0)
            took = time.monotonic() - started
    finally:
        fast.close()
        slow.close()
    assert {vote.server_name for vote in result.decision.votes} == {"fast", "slow"}
    assert took < 1.5, f"a 1 s budget took {took:.2f} s"
