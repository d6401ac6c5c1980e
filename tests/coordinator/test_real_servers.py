"""The coordinator against four real model server processes on loopback."""

from __future__ import annotations

import asyncio
import math
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import harness
import numpy as np
import pytest
from coordinator.helpers import MODELS, endpoint, four_endpoints, free_port, write_config

from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator import AsyncCoordinator, Coordinator, MissingReason, Signal
from xylen_server.errors import InvalidArgument, Unavailable


def direct_probability(server: harness.ServerProcess, inp: pb.PredictInput) -> float:
    with server.channel() as channel:
        response = server.stub(channel).Predict(pb.PredictRequest(inputs=[inp]), timeout=10)
    return float(response.predictions[0].probability_up)


def test_decision_equals_hand_computed_weighted_result(
    four_servers: list[harness.ServerProcess], fleet_candles: dict[str, np.ndarray], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", four_endpoints(four_servers))
    inputs = [harness.window_input(fleet_candles, end) for end in (250, 400, 599)]
    with Coordinator(config) as coordinator:
        result = coordinator.predict(inputs)
    assert result.missing == ()
    assert result.voters == ("model_1", "model_2", "model_3", "model_4")
    weights = {name: w for name, _, w in MODELS}
    for inp, row in zip(inputs, result.rows, strict=True):
        probs = {
            name: direct_probability(server, inp)
            for (name, _, _), server in zip(MODELS, four_servers, strict=True)
        }
        assert len(set(probs.values())) > 1, "the four models should not all agree exactly"
        expected = sum(weights[n] * probs[n] for n in probs) / sum(weights.values())
        spread = math.sqrt(sum(weights[n] * (probs[n] - expected) ** 2 for n in probs))
        assert row.probability == pytest.approx(expected, abs=1e-12)
        assert row.disagreement == pytest.approx(spread, abs=1e-12)
        signal_ = (
            Signal.BUY if expected >= 0.55 else Signal.SELL if expected <= 0.45 else Signal.HOLD
        )
        assert row.signal is signal_
        for vote in row.votes:
            assert vote.probability == pytest.approx(probs[vote.server_name], abs=1e-15)
            assert vote.normalized_weight == pytest.approx(weights[vote.server_name])
            assert vote.model_name == vote.server_name and vote.model_version == 1
            assert vote.model_prediction_id and vote.latency_seconds > 0
    assert len({row.prediction_id for row in result.rows}) == 3


def test_kill_9_mid_stream_three_carry_on_and_it_rejoins(
    four_servers: list[harness.ServerProcess],
    fleet_candles: dict[str, np.ndarray],
    fleet_models: Path,
    tmp_path: Path,
) -> None:
    victim_index = 1  # model_2, weight 0.3: the other three still carry 0.7 >= 0.5
    victim = four_servers[victim_index]
    config = write_config(tmp_path / "config.yaml", four_endpoints(four_servers))
    inp = [harness.window_input(fleet_candles, 500)]

    async def scenario() -> tuple[list[Any], list[Any], list[Any], int]:
        async with AsyncCoordinator(config) as coordinator:
            before: list[Any] = []
            during: list[Any] = []
            failures = 0
            stop = asyncio.Event()

            async def client() -> None:
                nonlocal failures
                while not stop.is_set():
                    try:
                        during.append(await coordinator.predict(inp))
                    except Exception:
                        failures += 1

            for _ in range(5):
                before.append(await coordinator.predict(inp))
            clients = [asyncio.create_task(client()) for _ in range(4)]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(victim.stop, signal.SIGKILL)
            await asyncio.sleep(0.5)
            after_kill = [await coordinator.predict(inp) for _ in range(5)]
            # Same model, same port, new process.
            restarted = await asyncio.to_thread(
                harness.start_server,
                fleet_models,
                "model_2",
                {"GRPC_PORT": str(victim.port), "SHUTDOWN_GRACE_SECONDS": "2"},
            )
            four_servers[victim_index] = restarted
            assert await coordinator.wait_serving(["model_2"], timeout=30)
            stop.set()
            await asyncio.gather(*clients)
            rejoined = [await coordinator.predict(inp) for _ in range(3)]
            return before + during, after_kill, rejoined, failures

    everything, after_kill, rejoined, failures = asyncio.run(scenario())
    assert failures == 0
    assert any(len(r.voters) == 4 for r in everything)
    for result in after_kill:
        assert result.voters == ("model_1", "model_3", "model_4")
        assert [m.server_name for m in result.missing] == ["model_2"]
        assert result.missing[0].reason in (MissingReason.NOT_SERVING, MissingReason.UNAVAILABLE)
        # renormalised over the three: 0.4/0.7, 0.2/0.7, 0.1/0.7
        shares = {v.server_name: v.normalized_weight for v in result.decision.votes}
        assert shares == pytest.approx({"model_1": 4 / 7, "model_3": 2 / 7, "model_4": 1 / 7})
    for result in rejoined:
        assert result.voters == ("model_1", "model_2", "model_3", "model_4")
        assert result.missing == ()


def test_slow_server_excluded_by_the_deadline(
    four_servers: list[harness.ServerProcess],
    fleet_candles: dict[str, np.ndarray],
    fleet_models: Path,
    tmp_path: Path,
) -> None:
    slow = harness.start_server(fleet_models, "model_4", env={"INFERENCE_DELAY_MS": "1500"})
    try:
        endpoints = [*four_endpoints(four_servers)[:3], endpoint("slow_4", slow.port, 0.1)]
        # Outlier detection off: this is about the deadline (ejection: test_faults.py).
        config = write_config(
            tmp_path / "config.yaml",
            endpoints,
            deadline_ms=400,
            outlier_detection={"enabled": False},
        )
        inp = [harness.window_input(fleet_candles, 420)]
        with Coordinator(config) as coordinator:
            results = [coordinator.predict(inp) for _ in range(3)]
            for result in results:
                assert result.voters == ("model_1", "model_2", "model_3")
                assert [m.server_name for m in result.missing] == ["slow_4"]
                assert result.missing[0].reason is MissingReason.DEADLINE_EXCEEDED
                assert result.duration_seconds < 1.5  # answered without waiting for it
            # A generous budget gets the slow server's own answer, matched to its own request
            # (the late answers of the calls above were dropped, not misattributed).
            patient = coordinator.predict(inp, timeout=8.0)
            assert patient.voters == ("model_1", "model_2", "model_3", "slow_4")
            slow_vote = next(v for v in patient.decision.votes if v.server_name == "slow_4")
            assert slow_vote.probability == pytest.approx(
                direct_probability(four_servers[3], inp[0])
            )
            assert slow_vote.latency_seconds >= 1.5
    finally:
        slow.stop()


def test_all_down_is_unavailable_naming_every_server(tmp_path: Path) -> None:
    endpoints = [endpoint(f"model_{i}", free_port(), 1.0) for i in range(1, 4)]
    config = write_config(tmp_path / "config.yaml", endpoints)
    with Coordinator(config, wait_seconds=5) as coordinator, pytest.raises(Unavailable) as info:
        coordinator.predict([harness.feature_input([0.0] * 5)])
    error = info.value
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "NO_QUORUM"
    for i in range(1, 4):
        assert f"model_{i}" in error.message
    assert "0 of 3 servers voted" in error.message
    assert error.metadata["voted"] == "none"


def test_input_every_server_refuses_is_invalid_argument(
    four_servers: list[harness.ServerProcess], fleet_candles: dict[str, np.ndarray], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", four_endpoints(four_servers))
    with Coordinator(config) as coordinator:
        with pytest.raises(InvalidArgument) as info:
            coordinator.predict([harness.window_input(fleet_candles, 300, length=10)])
        assert info.value.reason == "WINDOW_TOO_SHORT"
        with pytest.raises(InvalidArgument) as empty:
            coordinator.predict([])
        assert empty.value.reason == "EMPTY_BATCH"
        # and the coordinator is fine afterwards
        assert len(coordinator.predict([harness.window_input(fleet_candles, 300)]).voters) == 4


def test_not_serving_server_is_skipped_and_used_again(
    fleet_candles: dict[str, np.ndarray], fleet_models: Path, tmp_path: Path
) -> None:
    """A server that is up but NOT_SERVING (here: loading) is not asked, and is used as soon
    as it reports SERVING, without restarting the coordinator."""
    a = harness.start_server(fleet_models, "model_1")
    b = harness.start_server(fleet_models, "model_5", wait=False)
    try:
        config = write_config(
            tmp_path / "config.yaml", [endpoint("a", a.port, 1.0), endpoint("b", b.port, 1.0)]
        )
        with Coordinator(config) as coordinator:
            assert coordinator.wait_serving(["b"], timeout=60)
            result = coordinator.predict([harness.window_input(fleet_candles, 300)])
            assert result.voters == ("a", "b")
            b.stop()  # SIGTERM: NOT_SERVING, drain, exit
            for _ in range(50):
                if not any(e.serving for e in coordinator.endpoints() if e.name == "b"):
                    break
                time.sleep(0.1)
            result = coordinator.predict([harness.window_input(fleet_candles, 300)])
            assert result.voters == ("a",)
            assert result.missing[0].reason is MissingReason.NOT_SERVING
    finally:
        a.stop()
        b.stop()
