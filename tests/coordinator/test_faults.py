"""The ensemble under load and faults, against real model server processes on loopback.

* a bounded load at rising concurrency: every call answered, no error;
* a server hung with SIGSTOP: ejected after its first missed deadlines (later calls do not wait
  for it: its vote is missing with reason EJECTED), still ejected while its health probe
  fails, back in after SIGCONT;
* under load, a server killed with SIGKILL (and restarted), a server hung, a corrupt model
  dropped in and ReloadModel asked to swap to it: in each, every ensemble call answers within
  its deadline with the other votes, every outcome the coordinator acknowledged is in its
  outbox and reaches the servers that are up, and the failure shows in the logs and counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import harness
import numpy as np
import pytest
from coordinator.fleet_load import LoadReport, Outcome, library_call, run_load
from coordinator.helpers import MODELS, endpoint, write_config

from training.metadata import sha256_file
from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator import AsyncCoordinator, MissingReason

DEADLINE_MS = 1000
#: Most calls made while the victim is down, hung or swapping; calls made after it.
MAX_FAULT_CALLS = 5000
AFTER_CALLS = 40


@pytest.fixture
def victim(fleet_models: Path, tmp_path: Path) -> Iterator[harness.ServerProcess]:
    """A fourth server (model_4) on its own copy of the model, for a test to break."""
    models = tmp_path / "victim-models"
    shutil.copytree(fleet_models / "model_4", models / "model_4")
    server = harness.start_server(
        models, "model_4", log_dir=tmp_path, env={"SHUTDOWN_GRACE_SECONDS": "1"}
    )
    yield server
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()


def _config(
    tmp_path: Path,
    servers: list[harness.ServerProcess],
    victim: harness.ServerProcess,
    **extra: Any,
) -> Path:
    endpoints = [
        endpoint(name, s.port, w) for (name, _, w), s in zip(MODELS[:3], servers[:3], strict=False)
    ]
    endpoints.append(endpoint("victim", victim.port, MODELS[3][2]))
    sections: dict[str, Any] = {
        "deadline_ms": DEADLINE_MS,
        "retraining": {"feedback_delay_seconds": 0},
        "outlier_detection": {
            "consecutive_failures": 3,
            "base_ejection_seconds": 0.5,
            "max_ejection_seconds": 2.0,
            "probe_timeout_ms": 200,
        },
    }
    sections.update(extra)
    return write_config(tmp_path / "config.yaml", endpoints, **sections)


def _inputs(fleet_candles: dict[str, np.ndarray]) -> list[pb.PredictInput]:
    return [harness.window_input(fleet_candles, 500)]


class FeedbackSender:
    """Sends an outcome for every fifth answered call and remembers what was acknowledged."""

    def __init__(self, coordinator: AsyncCoordinator) -> None:
        self.coordinator = coordinator
        self.acked: dict[str, tuple[str, ...]] = {}
        self.n = 0

    async def __call__(self, outcome: Outcome) -> None:
        self.n += 1
        if self.n % 5:
            return
        ack = await self.coordinator.feedback(
            outcome.prediction_id, realized_return=0.01, close_time=datetime.now(UTC)
        )
        self.acked[outcome.prediction_id] = ack.forward_to


async def _settled(
    coordinator: AsyncCoordinator, acked: dict[str, tuple[str, ...]], timeout: float = 30
) -> dict[str, dict[str, tuple[str, int, str]]]:
    """Every acknowledged outcome's delivery states, once none is pending (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        states = {pid: await coordinator.delivery_states(pid) for pid in acked}
        pending = any(s[0] == "pending" for d in states.values() for s in d.values())
        if not pending or time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.2)


def _check_answered(report: LoadReport) -> None:
    """Every call answered (none failed, none waited past the deadline: the fan-out gives up
    on a server at the deadline), with at least the three healthy servers' votes."""
    assert report.errors == {}, report.errors
    assert report.answered == report.calls > 0
    for outcome in report.outcomes:
        assert set(outcome.voters) >= {"model_1", "model_2", "model_3"}, outcome


def _check_feedback(
    states: dict[str, dict[str, tuple[str, int, str]]], acked: dict[str, tuple[str, ...]]
) -> None:
    """Nothing acknowledged is lost: each outcome has a delivery per voter in the outbox, and
    the healthy servers have every one of theirs."""
    assert acked, "the load sent no feedback"
    for pid, targets in acked.items():
        assert set(states[pid]) == set(targets), pid
        for server, (state, _, error) in states[pid].items():
            if server != "victim":
                assert state == "delivered", (pid, server, state, error)


def test_load_at_rising_concurrency_every_call_answered(
    four_servers: list[harness.ServerProcess],
    fleet_candles: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, four_servers, four_servers[3])

    async def scenario() -> list[LoadReport]:
        async with AsyncCoordinator(config) as coordinator:
            assert await coordinator.wait_serving(timeout=30)
            call = library_call(coordinator, _inputs(fleet_candles))
            feedback = FeedbackSender(coordinator)
            reports = [
                await run_load(call, concurrency, calls=40, on_answer=feedback)
                for concurrency in (1, 4, 16)
            ]
            states = await _settled(coordinator, feedback.acked)
            for pid, targets in feedback.acked.items():
                assert {s: v[0] for s, v in states[pid].items()} == dict.fromkeys(
                    targets, "delivered"
                )
            return reports

    for report in asyncio.run(scenario()):
        assert report.errors == {} and report.answered == 40 and report.sheds == 0
        for outcome in report.outcomes:
            assert outcome.voters == ("model_1", "model_2", "model_3", "victim")
            assert outcome.missing == ()


def test_hung_server_is_ejected_answers_stay_fast_and_it_rejoins_after_sigcont(
    four_servers: list[harness.ServerProcess],
    fleet_candles: dict[str, np.ndarray],
    victim: harness.ServerProcess,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="xylen_coordinator")
    config = _config(tmp_path, four_servers, victim)
    inputs = _inputs(fleet_candles)

    async def scenario() -> None:
        async with AsyncCoordinator(config) as coordinator:
            assert await coordinator.wait_serving(timeout=30)
            assert (await coordinator.predict(inputs)).voters[-1] == "victim"
            victim.proc.send_signal(signal.SIGSTOP)
            try:
                # One deadline: the calls in flight when it hung miss its vote at the deadline.
                first = await asyncio.gather(*(coordinator.predict(inputs) for _ in range(4)))
                for result in first:
                    assert result.voters == ("model_1", "model_2", "model_3")
                    assert result.missing[0].reason is MissingReason.DEADLINE_EXCEEDED
                (state,) = [e for e in coordinator.endpoints() if e.name == "victim"]
                assert state.ejected and state.counts is not None
                assert state.counts.ejections == 1
                # From now on it is not waited for: not asked at all, reason EJECTED.
                after = [await coordinator.predict(inputs) for _ in range(20)]
                for result in after:
                    assert result.voters == ("model_1", "model_2", "model_3")
                    assert result.missing[0].reason is MissingReason.EJECTED
                    assert "health probe" in result.missing[0].message
                # Its probes time out while it is stopped: it stays out.
                await asyncio.sleep(1.5)
                assert (await coordinator.predict(inputs)).missing[0].reason is (
                    MissingReason.EJECTED
                )
            finally:
                victim.proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                result = await coordinator.predict(inputs)
                if "victim" in result.voters:
                    break
                await asyncio.sleep(0.1)
            assert result.voters == ("model_1", "model_2", "model_3", "victim")
            counts = coordinator.metrics.counts("victim")
            assert counts.ejections == 1 and counts.rejoins == 1
            assert counts.missing["DEADLINE_EXCEEDED"] == 4
            assert counts.missing["EJECTED"] >= 21

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("victim ejected for 0.5s after 3 consecutive") for m in messages)
    assert any(m.startswith("victim stays ejected") for m in messages)
    assert any(m.startswith("victim rejoined") for m in messages)


def _under_load(
    coordinator_config: Path,
    inputs: list[pb.PredictInput],
    fault: Any,
) -> tuple[LoadReport, LoadReport, dict[str, dict[str, tuple[str, int, str]]],
           dict[str, tuple[str, ...]], AsyncCoordinator]:  # fmt: skip
    """Calls at concurrency 8 from before ``fault(coordinator)`` (a coroutine function) starts
    until it has finished (at most MAX_FAULT_CALLS), then AFTER_CALLS more; then let the
    feedback settle. Returns the load during the fault and the load after it as one report."""

    async def scenario() -> Any:
        async with AsyncCoordinator(coordinator_config) as coordinator:
            assert await coordinator.wait_serving(timeout=30)
            feedback = FeedbackSender(coordinator)
            call = library_call(coordinator, inputs)
            done = asyncio.Event()
            load = asyncio.ensure_future(
                run_load(call, 8, MAX_FAULT_CALLS, max_seconds=120, on_answer=feedback, stop=done)
            )
            await asyncio.sleep(0.3)
            try:
                await fault(coordinator)
            finally:
                done.set()
            during = await load
            after = await run_load(call, 8, AFTER_CALLS, on_answer=feedback)
            states = await _settled(coordinator, feedback.acked)
            return during, after, states, feedback.acked, coordinator

    result: Any = asyncio.run(scenario())
    return result  # type: ignore[no-any-return]


def test_server_killed_mid_load(
    four_servers: list[harness.ServerProcess],
    fleet_candles: dict[str, np.ndarray],
    victim: harness.ServerProcess,
    fleet_models: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="xylen_coordinator")
    config = _config(tmp_path, four_servers, victim)
    restarted: list[harness.ServerProcess] = []

    async def kill(coordinator: AsyncCoordinator) -> None:
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        await asyncio.sleep(1.0)  # calls go on without it
        models = tmp_path / "victim-models"
        server = await asyncio.to_thread(
            harness.start_server, models, "model_4", env={"GRPC_PORT": str(victim.port)}
        )
        restarted.append(server)
        assert await coordinator.wait_serving(["victim"], timeout=30)

    try:
        report, after, states, acked, coordinator = _under_load(
            config, _inputs(fleet_candles), kill
        )
    finally:
        for server in restarted:
            server.stop()
    _check_answered(report)
    missing = report.missing()
    lost = {reason for (server, reason) in missing if server == "victim"}
    assert lost and lost <= {"UNAVAILABLE", "NOT_SERVING", "EJECTED", "DEADLINE_EXCEEDED"}
    _check_answered(after)
    assert all(o.voters[-1] == "victim" for o in after.outcomes), "it rejoined"
    _check_feedback(states, acked)
    # The victim too gets every outcome: those whose prediction its kill -9 took with its
    # unflushed prediction log are sent again with the features they were predicted on.
    victim_states = {pid: s["victim"] for pid, s in states.items() if "victim" in s}
    assert victim_states
    for pid, (state, _, error) in victim_states.items():
        assert state == "delivered", (pid, state, error)
    counts = coordinator.metrics.counts("victim")
    assert sum(counts.missing.values()) == sum(n for (s, _), n in missing.items() if s == "victim")
    assert any(
        (r.getMessage().startswith("victim (127.0.0.1") and "unreachable" in r.getMessage())
        or "health NOT_SERVING" in r.getMessage()
        for r in caplog.records
    )


def test_server_hung_mid_load(
    four_servers: list[harness.ServerProcess],
    fleet_candles: dict[str, np.ndarray],
    victim: harness.ServerProcess,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="xylen_coordinator")
    config = _config(tmp_path, four_servers, victim)

    async def hang(coordinator: AsyncCoordinator) -> None:
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(3.0)
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while coordinator.metrics.counts("victim").rejoins == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    report, after, states, acked, coordinator = _under_load(config, _inputs(fleet_candles), hang)
    _check_answered(report)
    reasons = [r for (server, r) in report.missing() if server == "victim"]
    assert "DEADLINE_EXCEEDED" in reasons and "EJECTED" in reasons
    missed = report.missing()
    # The deadline was paid by the calls in flight when it hung, not by every call after.
    assert missed[("victim", "EJECTED")] > missed[("victim", "DEADLINE_EXCEEDED")]
    _check_feedback(states, acked)
    _check_answered(after)
    assert all(o.voters[-1] == "victim" for o in after.outcomes), "it rejoined"
    counts = coordinator.metrics.counts("victim")
    assert counts.ejections >= 1 and counts.rejoins >= 1
    assert any("victim ejected for" in r.getMessage() for r in caplog.records)


def test_corrupt_model_dropped_in_during_a_swap_keeps_the_serving_model(
    four_servers: list[harness.ServerProcess],
    fleet_candles: dict[str, np.ndarray],
    victim: harness.ServerProcess,
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, four_servers, victim)
    model_dir = tmp_path / "victim-models" / "model_4"
    refused: list[grpc.RpcError] = []

    async def corrupt(coordinator: AsyncCoordinator) -> None:
        # A new version whose booster file is garbage (its checksum matches the garbage).
        meta = json.loads((model_dir / "metadata.json").read_text())
        native = model_dir / "lightgbm_model.txt"
        native.write_bytes(b"\x00garbage, not a model\n" * 100)
        meta["version"] = 2
        meta["checksums"] = {native.name: sha256_file(native)}
        (model_dir / "metadata.json").write_text(json.dumps(meta))
        with victim.channel() as channel:
            try:
                await asyncio.to_thread(
                    victim.stub(channel).ReloadModel, pb.ReloadModelRequest(), timeout=60
                )
            except grpc.RpcError as error:
                refused.append(error)

    report, after, states, acked, coordinator = _under_load(config, _inputs(fleet_candles), corrupt)
    assert len(refused) == 1, "ReloadModel must refuse the corrupt model"
    code = refused[0].code()  # type: ignore[attr-defined]
    assert code not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
    _check_answered(report)
    # The victim kept voting with the model it served (v1) through the refused swap.
    for outcome in report.outcomes + after.outcomes:
        assert outcome.voters == ("model_1", "model_2", "model_3", "victim")
    with victim.channel() as channel:
        info = victim.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.model_info.version == 1
    _check_feedback(states, acked)
    assert all(s["victim"][0] == "delivered" for s in states.values())
    assert coordinator.metrics.counts("victim").missing == {}
    assert "reload refused, v1 keeps serving" in victim.log()
