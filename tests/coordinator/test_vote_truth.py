"""Trade outcomes reach only the models whose label they are, and votes are scored against the
label each model was trained for (net of its own fee), over real servers.

1. A 4-bar model under a 1-bar ensemble never gets the 1-bar outcome (it would store a sample
   labelled by the move over the wrong horizon): skipped, counted, logged, listed in the ack.
2. Adaptive weights: an informative model earns more weight than a random one, and a model
   right before fees but wrong after them is not rewarded.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest
from coordinator.helpers import endpoint, write_config, write_model_with
from coordinator.lying_model_server import LyingModelServer
from prometheus_client import generate_latest

from training.labels import label_from_return
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator import Coordinator
from xylen_coordinator.feedback import HORIZON_MISMATCH, HORIZON_UNKNOWN, _eligible
from xylen_coordinator.outbox import Outbox, PredictionRecord
from xylen_coordinator.telemetry import CoordinatorTelemetry

FEE = 0.001
ROW = [pb.PredictInput(features=types_pb2.FeatureVector(values=[0.1, 0.2]))]


# -- 1. the horizon ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_horizons(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, harness.ServerProcess]]:
    root = tmp_path_factory.mktemp("vote-truth")
    write_model_with(root, "h1a", 1, fee=FEE)
    write_model_with(root, "h1b", 2, fee=FEE)
    write_model_with(root, "h4", 3, fee=FEE, horizon=4)
    servers = {name: harness.start_server(root, name, wait=False) for name in ("h1a", "h1b", "h4")}
    try:
        for process in servers.values():
            process.wait_serving()
        yield servers
    finally:
        for process in servers.values():
            process.stop()


def _wait_for_info(coordinator: Coordinator) -> None:
    deadline = time.monotonic() + 10
    while not all(state.sends_features for state in coordinator.endpoints()):
        assert time.monotonic() < deadline, "servers never reported their model info"
        time.sleep(0.05)


def _not_forwarded(coordinator: Coordinator) -> dict[str, dict[str, int]]:
    states = coordinator.endpoints()
    assert all(state.counts is not None for state in states)
    return {s.name: s.counts.feedback_not_forwarded for s in states if s.counts is not None}


def test_an_outcome_reaches_only_the_voters_of_its_horizon(
    mixed_horizons: dict[str, harness.ServerProcess],
    fleet_candles: dict,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    weights = {"h1a": 0.5, "h1b": 0.3, "h4": 0.2}
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint(n, mixed_horizons[n].port, w) for n, w in weights.items()],
        retraining={"enabled": True, "feedback_delay_seconds": 0.0},
    )
    with Coordinator(config) as coordinator:
        assert coordinator.wait_serving(timeout=30)
        _wait_for_info(coordinator)
        row = coordinator.predict([harness.window_input(fleet_candles, 400)]).rows[0]
        votes = {v.server_name: v for v in row.votes}
        assert set(votes) == set(weights)  # h4 voted (its vote is reported, not combined)
        with caplog.at_level("INFO", logger="xylen_coordinator.feedback"):
            ack = coordinator.feedback(
                row.prediction_id, realized_return=0.0, underlying_log_return=0.004
            )
        assert set(ack.forward_to) == {"h1a", "h1b"}
        assert ack.not_forwarded == {"h4": HORIZON_MISMATCH}
        assert "not forwarded to h4 (HORIZON_MISMATCH)" in caplog.text
        assert "label horizon is 4 bars, the outcome's (the ensemble's) 1" in caplog.text
        assert _not_forwarded(coordinator) == {"h1a": {}, "h1b": {}, "h4": {HORIZON_MISMATCH: 1}}
        # ... and exported on the metrics port's registry.
        telemetry = CoordinatorTelemetry(coordinator.aio)
        scraped = generate_latest(telemetry.meters.registry).decode()
        assert (
            'xylen_coordinator_feedback_not_forwarded_total{endpoint="h4",'
            'reason="HORIZON_MISMATCH"} 1.0' in scraped
        )
        assert 'feedback_not_forwarded_total{endpoint="h1a"' not in scraped
        deadline = time.monotonic() + 20
        while True:
            states = coordinator.delivery_states(row.prediction_id)
            if all(s[0] == "delivered" for s in states.values()) and len(states) == 2:
                break
            assert time.monotonic() < deadline, f"not delivered: {states}"
            time.sleep(0.05)
        assert set(states) == {"h1a", "h1b"}  # no delivery row for h4 at all
        # A duplicate outcome counts nothing twice.
        again = coordinator.feedback(
            row.prediction_id, realized_return=0.0, underlying_log_return=0.004
        )
        assert again.duplicate
        assert _not_forwarded(coordinator)["h4"] == {HORIZON_MISMATCH: 1}
    # The real 4-bar server holds no sample from it: the first outcome it stores is the one
    # sent with the move over its own horizon, straight to it.
    with mixed_horizons["h4"].channel() as channel:
        stub = mixed_horizons["h4"].stub(channel)
        outcome = pb.TradeOutcome(realized_return=0.0, underlying_log_return=0.011)
        outcome.close_time.GetCurrentTime()
        answer = stub.Feedback(
            pb.FeedbackRequest(prediction_id=votes["h4"].model_prediction_id, outcome=outcome),
            timeout=10,
        )
    assert not answer.duplicate and answer.stored_samples == 1
    # The label definitions are on disk with the outcome: a restarted coordinator rescoring
    # its outbox skips h4 as well.
    outbox = Outbox(tmp_path / "feedback.sqlite3")
    try:
        [stored] = outbox.db.execute("SELECT labels FROM outcomes").fetchall()
        assert '"h4": [4, 0.001, 0.0]' in stored[0] and '"ensemble": [1, 0.001, 0.0]' in stored[0]
    finally:
        outbox._executor.submit(outbox._close).result()
        outbox._executor.shutdown()


def test_a_voter_of_unknown_horizon_is_skipped_and_unknown_labels_forward_to_all() -> None:
    votes = {"a": ("a-1", 0.6), "b": ("b-1", 0.4), "c": ("c-1", 0.5)}
    h1, h4 = (1, FEE, 0.0), (4, FEE, 0.0)
    record = PredictionRecord("BUY", votes, label=h1, labels={"a": h1, "b": h4})
    assert _eligible(record) == (("a",), {"b": HORIZON_MISMATCH, "c": HORIZON_UNKNOWN})
    # An outbox from before labels were kept, or servers without GetModelInfo: all, as before.
    assert _eligible(PredictionRecord("BUY", votes)) == (("a", "b", "c"), {})


# -- 2. the scores ----------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[LyingModelServer, LyingModelServer]]:
    servers = (LyingModelServer("a"), LyingModelServer("b"))
    for server in servers:
        server.horizon, server.fee, server.label_threshold = 1, FEE, 0.0
    yield servers
    for server in servers:
        server.close()


def _play(
    tmp_path: Path,
    pair: tuple[LyingModelServer, LyingModelServer],
    rounds: list[tuple[float, float, float]],
) -> dict[str, tuple[float, float, float]]:
    """Each round: the two servers' probabilities, then the underlying's 1-bar move as the
    outcome. Returns name -> (Brier, hit rate, multiplier) of the adaptive record."""
    a, b = pair
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint("a", a.port, 1.0), endpoint("b", b.port, 1.0)],
        retraining={"enabled": True, "feedback_delay_seconds": 0.0},
        weights={
            "mode": "adaptive",
            "adaptive": {"min_outcomes": 10, "half_life_outcomes": 1000, "floor": 0.1, "cap": 5},
        },
    )
    with Coordinator(config) as coordinator:
        for p_a, p_b, move in rounds:
            a.probability, b.probability = p_a, p_b
            decision = coordinator.predict(ROW).decision
            votes = {v.server_name: v.probability for v in decision.votes}
            assert votes == {"a": p_a, "b": p_b}
            ack = coordinator.feedback(
                decision.prediction_id, realized_return=0.0, underlying_log_return=move
            )
            assert set(ack.forward_to) == {"a", "b"} and not ack.not_forwarded
        scores = {state.name: state.adaptive for state in coordinator.endpoints()}
    # A restarted coordinator rebuilds the same record from its outbox (the labels are on disk).
    with Coordinator(config) as again:
        rebuilt = {state.name: state.adaptive for state in again.endpoints()}
    assert rebuilt == scores
    return {
        n: (s.brier_score, s.hit_rate, s.multiplier) for n, s in scores.items() if s is not None
    }


def _net_label(move: float) -> float:
    return float(label_from_return(move, fee=FEE, threshold=0.0))


def test_an_informative_model_earns_more_weight_than_a_random_one(
    tmp_path: Path, pair: tuple[LyingModelServer, LyingModelServer]
) -> None:
    rng = random.Random(7)
    rounds = []
    for _ in range(60):
        move = rng.choice([-0.01, -0.003, 0.0005, 0.003, 0.01])
        informative = 0.8 if _net_label(move) else 0.2
        rounds.append((informative, rng.random(), move))
    got = _play(tmp_path, pair, rounds)
    expected_b = sum((p_b - _net_label(m)) ** 2 for _, p_b, m in rounds) / len(rounds)
    assert got["a"][0] == pytest.approx(0.04, abs=1e-9)  # 0.2 off on every outcome
    assert got["b"][0] == pytest.approx(expected_b, rel=1e-2)  # decayed mean, half-life 1000
    assert got["a"][1] == 1.0  # every call on the right side of 0.5 of the net label
    assert got["a"][2] == 5.0 and got["b"][2] < 1.5  # a: capped 0.25/0.04; b: about 1
    assert got["a"][2] > 3 * got["b"][2]


def test_a_model_right_before_fees_but_wrong_after_them_is_not_rewarded(
    tmp_path: Path, pair: tuple[LyingModelServer, LyingModelServer]
) -> None:
    # Small rises that do not pay the 0.1% fee, and falls. "a" predicts the gross move (up on
    # every rise), "b" the label it was trained for (a rise that does not pay the fee is 0).
    small_rise = 0.0005
    assert small_rise > 0 and _net_label(small_rise) == 0.0 and math.log1p(-FEE) < -small_rise
    rounds = [(0.9, 0.1, small_rise) if i % 2 else (0.1, 0.1, -0.002) for i in range(30)]
    got = _play(tmp_path, pair, rounds)
    # a is wrong (0.9 vs label 0) on half of them: Brier (0.81 + 0.01) / 2 = 0.41 > a coin's.
    assert got["a"][0] == pytest.approx(0.41, rel=1e-2)
    assert got["a"][1] == pytest.approx(0.5, rel=1e-2)
    assert got["a"][2] < 1.0  # below its configured weight: not rewarded
    assert got["b"][0] == pytest.approx(0.01, abs=1e-9) and got["b"][1] == 1.0
    assert got["b"][2] == 5.0


def test_a_fee_outside_0_1_reported_by_a_server_leaves_its_vote_unscored(
    tmp_path: Path, pair: tuple[LyingModelServer, LyingModelServer]
) -> None:
    a, b = pair
    a.fee = 1.5  # what no model's label can be netted with
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint("a", a.port, 1.0), endpoint("b", b.port, 2.0)],
        retraining={"enabled": True, "feedback_delay_seconds": 0.0},
        weights={"mode": "adaptive"},
    )
    with Coordinator(config) as coordinator:
        decision = coordinator.predict(ROW).decision
        ack = coordinator.feedback(
            decision.prediction_id, realized_return=0.0, underlying_log_return=0.01
        )
        assert not ack.duplicate and set(ack.forward_to) == {"a", "b"}  # same horizon
        scores = {s.name: s.adaptive for s in coordinator.endpoints()}
    assert scores["a"] is not None and scores["a"].effective_outcomes == 0.0
    assert scores["b"] is not None and scores["b"].effective_outcomes == 1.0
