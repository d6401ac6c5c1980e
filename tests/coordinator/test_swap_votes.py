"""A hot swap drops no vote: right after real servers swap to a model version the coordinator was
never told about (RollbackModel to a kept version, with the admin token), the very first ensemble
calls count every server's vote with the new version, and swapping all four at once is no
NO_QUORUM. The coordinator asks the swapped server's GetModelInfo inside the call and counts the
vote once the server confirms it; a server that does not confirm stays REJECTED (see
test_untrusted_votes.py). Four real server processes on loopback, real ONNX sessions."""

from __future__ import annotations

import concurrent.futures
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import harness
import numpy as np
import pytest
from coordinator.helpers import MODELS, endpoint, write_config
from coordinator.lying_model_server import LyingModelServer
from coordinator.recording_model_server import RecordingModelServer
from learning_helpers import add_version

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator import Coordinator, MissingReason
from xylen_coordinator.endpoints import CONFIRM_BURST, CONFIRM_PER_SECOND
from xylen_server.auth import bearer_metadata
from xylen_server.errors import Unavailable

TOKEN = "swap-votes-admin-token"
#: Ensemble calls made right after each swap.
CALLS = 5


@pytest.fixture
def fleet(fleet_models: Path, tmp_path: Path) -> Iterator[list[harness.ServerProcess]]:
    """Four servers on their own copies of the fleet's models (version 1), each with kept
    versions 2 and 3 to swap to, and an admin token."""
    models = tmp_path / "models"
    for seed, (name, _, _) in enumerate(MODELS, start=1):
        shutil.copytree(fleet_models / name, models / name)
        add_version(models, 2, seed=10 * seed, name=name)
        add_version(models, 3, seed=10 * seed + 1, name=name)
    env = {"ADMIN_TOKEN": TOKEN, "SHUTDOWN_GRACE_SECONDS": "1"}
    servers = [
        harness.start_server(models, name, env=env, wait=False, log_dir=tmp_path)
        for name, _, _ in MODELS
    ]
    try:
        for server in servers:
            server.wait_serving()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _rollback(server: harness.ServerProcess, version: int) -> int:
    with server.channel() as channel:
        response = server.stub(channel).RollbackModel(
            pb.RollbackModelRequest(version=version), timeout=60, metadata=bearer_metadata(TOKEN)
        )
    return int(response.model_info.version)


def _calls(coordinator: Coordinator, inputs: list[pb.PredictInput]) -> tuple[int, list[dict]]:
    """:data:`CALLS` ensemble calls at once after a swap: the votes missing (all of them for a
    NO_QUORUM call) and each answered call's versions by voter."""
    missing = 0
    versions = []
    for _ in range(CALLS):
        try:
            result = coordinator.predict(inputs)
        except Unavailable as error:
            assert error.reason == "NO_QUORUM", error.message
            missing += len(MODELS)
            continue
        missing += len(result.missing)
        versions.append({v.server_name: v.model_version for v in result.decision.votes})
    return missing, versions


def test_votes_right_after_a_swap_to_an_unknown_version_all_count(
    fleet: list[harness.ServerProcess], fleet_candles: dict[str, np.ndarray], tmp_path: Path
) -> None:
    names = [name for name, _, _ in MODELS]
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint(name, s.port, w) for (name, _, w), s in zip(MODELS, fleet, strict=True)],
    )
    inputs = [harness.window_input(fleet_candles, 500)]
    with Coordinator(config) as coordinator:
        assert coordinator.wait_serving(timeout=30)
        # Every server's GetModelInfo has been answered: version 1 is all the coordinator knows.
        deadline = time.monotonic() + 30
        while not all(s.sends_features for s in coordinator.endpoints()):
            assert time.monotonic() < deadline, "the servers' model info never arrived"
            time.sleep(0.05)
        before = coordinator.predict(inputs)
        assert {v.server_name: v.model_version for v in before.decision.votes} == dict.fromkeys(
            names, 1
        )
        rejected_before = sum(
            coordinator.aio.metrics.counts(n).rejected.get("UNKNOWN_MODEL_VERSION", 0)
            for n in names
        )

        # One server swaps to version 2, then the next calls come at once.
        assert _rollback(fleet[3], 2) == 2
        missing_one, versions = _calls(coordinator, inputs)
        assert missing_one == 0, f"{missing_one} votes missing right after one swap"
        assert versions == [{**dict.fromkeys(names, 1), "model_4": 2}] * CALLS

        # All four swap together (model_4 to 3, the others to 2): still no NO_QUORUM.
        targets = {"model_1": 2, "model_2": 2, "model_3": 2, "model_4": 3}
        with concurrent.futures.ThreadPoolExecutor(len(fleet)) as pool:
            swapped = list(pool.map(_rollback, fleet, [targets[n] for n in names]))
        assert swapped == [targets[n] for n in names]
        missing_all, versions = _calls(coordinator, inputs)
        assert missing_all == 0, f"{missing_all} votes missing right after all four swapped"
        assert versions == [targets] * CALLS

        # Each unknown version cost one GetModelInfo inside a call, never a rejected vote.
        rejected_after = sum(
            coordinator.aio.metrics.counts(n).rejected.get("UNKNOWN_MODEL_VERSION", 0)
            for n in names
        )
        assert rejected_after == rejected_before == 0
        assert all(coordinator.aio.metrics.counts(n).missing == {} for n in names)


@pytest.fixture
def pair() -> Iterator[tuple[RecordingModelServer, LyingModelServer]]:
    honest, liar = RecordingModelServer("model_a", 0.8), LyingModelServer("liar")
    yield honest, liar
    honest.close()
    liar.close()


def test_concurrent_calls_after_a_swap_ask_once_and_a_lie_is_asked_at_a_bounded_rate(
    pair: tuple[RecordingModelServer, LyingModelServer], tmp_path: Path
) -> None:
    honest, liar = pair
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint("model_a", honest.port, 1.0), endpoint("liar", liar.port, 1.0)],
    )
    feature = [pb.PredictInput(features=types_pb2.FeatureVector(values=[0.0] * 3))]
    with Coordinator(config) as coordinator:
        assert coordinator.wait_serving(timeout=10)
        deadline = time.monotonic() + 10
        while coordinator.predict(feature).voters != ("model_a", "liar"):
            assert time.monotonic() < deadline, "the liar's model info never arrived"
            time.sleep(0.02)
        # An honest swap to version 2, then eight calls at once: one GetModelInfo, shared by
        # all of them (single-flight), and every call counts the new version.
        asked = liar.info_calls
        liar.info_version = liar.model_version = 2
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: coordinator.predict(feature), range(8)))
        assert [r.voters for r in results] == [("model_a", "liar")] * 8
        assert {
            v.model_version for r in results for v in r.decision.votes if v.server_name == "liar"
        } == {2}
        assert liar.info_calls - asked == 1

        # A lie: votes name version 7, GetModelInfo still says 2. Each stays REJECTED with
        # what the server said, and the server is asked no more than the bucket allows.
        liar.model_version = 7
        asked = liar.info_calls
        started = time.monotonic()
        for _ in range(30):
            result = coordinator.predict(feature)
            assert result.voters == ("model_a",)
            (missing,) = result.missing
            assert missing.reason is MissingReason.REJECTED
            assert missing.error_reason == "UNKNOWN_MODEL_VERSION"
            assert "model version 7" in missing.message
            assert len(missing.message) < 300
        elapsed = time.monotonic() - started
        assert "GetModelInfo reports 'liar' version 2" in missing.message or (
            "not asked again so soon" in missing.message
        )
        requests = liar.info_calls - asked
        assert 1 <= requests <= CONFIRM_BURST + CONFIRM_PER_SECOND * elapsed + 1
        counts = coordinator.aio.metrics.counts("liar")
        assert counts.rejected == {"UNKNOWN_MODEL_VERSION": 30}
