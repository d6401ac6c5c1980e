"""One row's decision from its votes, by hand, without gRPC."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator.config import Thresholds
from xylen_coordinator.decision import Vote, decide
from xylen_coordinator.ensemble import AdaptiveScore
from xylen_coordinator.results import VoteInfo
from xylen_server.errors import Unavailable
from xylen_server.signals import Signal

T = Thresholds(buy=0.55, sell=0.45)


def vote(name: str, p: float, signal: types_pb2.Signal.ValueType, latency: float = 0.01) -> Vote:
    prediction = pb.Prediction(
        prediction_id=f"{name}-7",
        probability_up=p,
        signal=signal,
        model_name=f"model_{name}",
        model_version=3,
    )
    return Vote(prediction, latency)


def test_votes_combined_and_each_explained_by_hand() -> None:
    votes = {
        "b": vote("b", 0.8, types_pb2.SIGNAL_BUY, 0.002),
        "a": vote("a", 0.6, types_pb2.SIGNAL_HOLD, 0.001),
        "c": vote("c", 0.3, types_pb2.SIGNAL_SELL, 0.003),
    }
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    configured = {"a": 1.0, "b": 0.6, "c": 0.4}
    row = decide("ens-x-1", votes, weights, configured, T)
    assert row.prediction_id == "ens-x-1"
    # 0.5*0.6 + 0.3*0.8 + 0.2*0.3 = 0.30 + 0.24 + 0.06 = 0.60
    assert row.probability == pytest.approx(0.60, abs=1e-12)
    assert row.signal is Signal.BUY
    # sqrt(0.5*0^2 + 0.3*0.2^2 + 0.2*0.3^2) = sqrt(0.012 + 0.018)
    assert row.disagreement == pytest.approx(math.sqrt(0.03), abs=1e-12)
    assert [v.server_name for v in row.votes] == ["b", "a", "c"]  # the order of the votes
    assert [v.normalized_weight for v in row.votes] == pytest.approx([0.3, 0.5, 0.2])
    assert replace(row.votes[0], normalized_weight=0.3) == VoteInfo(
        server_name="b",
        probability=0.8,
        signal=Signal.BUY,
        normalized_weight=0.3,
        weight=0.3,
        configured_weight=0.6,
        model_name="model_b",
        model_version=3,
        model_prediction_id="b-7",
        latency_seconds=0.002,
        adaptive=None,
    )
    assert [v.signal for v in row.votes] == [Signal.BUY, Signal.HOLD, Signal.SELL]


def test_shares_renormalised_over_the_voters() -> None:
    votes = {"a": vote("a", 0.6, types_pb2.SIGNAL_BUY), "b": vote("b", 0.8, types_pb2.SIGNAL_BUY)}
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    row = decide("ens-x-2", votes, weights, weights, T)
    # (0.5*0.6 + 0.3*0.8) / 0.8 = 0.54 / 0.8
    assert row.probability == pytest.approx(0.675, abs=1e-12)
    assert [v.normalized_weight for v in row.votes] == pytest.approx([0.625, 0.375])
    assert [v.weight for v in row.votes] == [0.5, 0.3]


def test_unspecified_vote_signal_reads_as_hold() -> None:
    row = decide(
        "ens-x-3", {"a": vote("a", 0.5, types_pb2.SIGNAL_UNSPECIFIED)}, {"a": 1}, {"a": 1}, T
    )
    assert row.votes[0].signal is Signal.HOLD
    assert row.signal is Signal.HOLD  # 0.5 is between the thresholds


def test_adaptive_scores_explain_the_weights() -> None:
    good = AdaptiveScore(
        "brier", brier_score=0.01, hit_rate=1.0, effective_outcomes=5.0, multiplier=2.0
    )
    bad = AdaptiveScore(
        "brier", brier_score=0.81, hit_rate=0.0, effective_outcomes=5.0, multiplier=0.5
    )
    votes = {"a": vote("a", 0.9, types_pb2.SIGNAL_BUY), "b": vote("b", 0.1, types_pb2.SIGNAL_SELL)}
    configured = {"a": 1.0, "b": 1.0}
    weights = {"a": 2.0, "b": 0.5}  # configured x multiplier
    row = decide("ens-x-4", votes, weights, configured, T, {"a": good, "b": bad})
    # (2*0.9 + 0.5*0.1) / 2.5 = 1.85 / 2.5
    assert row.probability == pytest.approx(0.74, abs=1e-12)
    assert row.signal is Signal.BUY
    # sqrt(0.8*0.16^2 + 0.2*0.64^2) = sqrt(0.02048 + 0.08192) = sqrt(0.1024)
    assert row.disagreement == pytest.approx(0.32, abs=1e-12)
    assert [v.normalized_weight for v in row.votes] == pytest.approx([0.8, 0.2])
    assert [v.configured_weight for v in row.votes] == [1.0, 1.0]
    assert [v.adaptive for v in row.votes] == [good, bad]


def test_no_voter_with_weight_is_no_quorum() -> None:
    votes = {"z": vote("z", 0.9, types_pb2.SIGNAL_BUY), "y": vote("y", 0.2, types_pb2.SIGNAL_SELL)}
    with pytest.raises(Unavailable) as zero:
        decide("ens-x-5", votes, {"z": 0.0, "y": 0.0}, {"z": 0.0, "y": 0.0}, T)
    assert zero.value.reason == "NO_QUORUM"
    assert zero.value.metadata == {"voted": "z,y"}
    with pytest.raises(Unavailable) as nobody:
        decide("ens-x-6", {}, {"a": 1.0}, {"a": 1.0}, T)
    assert nobody.value.reason == "NO_QUORUM"
