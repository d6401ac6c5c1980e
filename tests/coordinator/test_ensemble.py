"""The ensemble arithmetic, by hand, without gRPC."""

from __future__ import annotations

import math

import pytest

from xylen_coordinator.config import MAX_WEIGHT, Adaptive, Quorum, Thresholds
from xylen_coordinator.ensemble import (
    AdaptiveWeights,
    NoVotes,
    Signal,
    adaptive_multiplier,
    combine,
    quorum_shortfall,
)

T = Thresholds(buy=0.55, sell=0.45)
W = {"a": 0.5, "b": 0.3, "c": 0.2}


def test_weighted_mean_signal_and_disagreement_by_hand() -> None:
    decision = combine({"a": 0.6, "b": 0.8, "c": 0.3}, W, T)
    # 0.5*0.6 + 0.3*0.8 + 0.2*0.3 = 0.30 + 0.24 + 0.06 = 0.60
    assert decision.probability == pytest.approx(0.60, abs=1e-12)
    assert decision.signal is Signal.BUY
    # sqrt(0.5*0^2 + 0.3*0.2^2 + 0.2*0.3^2) = sqrt(0.012 + 0.018)
    assert decision.disagreement == pytest.approx(math.sqrt(0.03), abs=1e-12)
    assert dict(decision.weights) == pytest.approx(W)


def test_weights_renormalised_over_voters() -> None:
    decision = combine({"a": 0.6, "b": 0.8}, W, T)
    # (0.5*0.6 + 0.3*0.8) / 0.8 = 0.54 / 0.8
    assert decision.probability == pytest.approx(0.675, abs=1e-12)
    assert dict(decision.weights) == pytest.approx({"a": 0.625, "b": 0.375})
    assert sum(decision.weights.values()) == pytest.approx(1.0)


def test_unanimous_votes_do_not_disagree() -> None:
    decision = combine({"a": 0.42, "b": 0.42, "c": 0.42}, W, T)
    assert decision.disagreement == pytest.approx(0.0, abs=1e-15)
    assert decision.probability == pytest.approx(0.42)
    assert decision.signal is Signal.SELL


@pytest.mark.parametrize(
    ("weights", "vote"),
    [
        ({"a": 3.0, "b": 0.1}, 0.55),
        ({"a": 1.0, "b": 2.0}, 0.58),
        ({name: 1.0 for name in "abcdef"}, 0.58),
        ({"a": 0.7, "b": 0.2, "c": 0.1}, 0.45),
    ],
)
def test_unanimous_votes_are_that_vote_exactly_and_keep_its_signal(
    weights: dict[str, float], vote: float
) -> None:
    # Dividing each weight by the total first put two votes of 0.55 at 0.5499999999999999:
    # a unanimous BUY at the threshold came out HOLD.
    decision = combine(dict.fromkeys(weights, vote), weights, T)
    assert decision.probability == vote
    assert decision.signal is (Signal.BUY if vote >= T.buy else Signal.SELL)


@pytest.mark.parametrize(
    ("p", "signal"),
    [
        (0.55, Signal.BUY),
        (0.5500001, Signal.BUY),
        (0.45, Signal.SELL),
        (0.4499, Signal.SELL),
        (0.5, Signal.HOLD),
        (0.5499, Signal.HOLD),
        (0.4501, Signal.HOLD),
    ],
)
def test_thresholds_inclusive_like_the_servers(p: float, signal: Signal) -> None:
    assert combine({"a": p}, W, T).signal is signal


def test_maximal_disagreement_is_half() -> None:
    decision = combine({"a": 0.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, T)
    assert decision.probability == pytest.approx(0.5)
    assert decision.disagreement == pytest.approx(0.5)


def test_zero_weight_voter_counts_for_nothing() -> None:
    decision = combine({"a": 0.9, "z": 0.1}, {"a": 1.0, "z": 0.0}, T)
    assert decision.probability == pytest.approx(0.9)
    with pytest.raises(NoVotes):
        combine({"z": 0.1}, {"z": 0.0}, T)
    with pytest.raises(NoVotes):
        combine({}, W, T)


def test_bad_votes_are_refused() -> None:
    with pytest.raises(ValueError, match="no weight"):
        combine({"q": 0.5}, W, T)
    with pytest.raises(ValueError, match="not in"):
        combine({"a": 1.5}, W, T)
    with pytest.raises(ValueError, match="not in"):
        combine({"a": math.nan}, W, T)


def test_quorum_by_weight_fraction_and_count() -> None:
    enabled = {"m1": 0.4, "m2": 0.3, "m3": 0.2, "m4": 0.1}
    half = Quorum(min_weight_fraction=0.5, min_votes=1)
    assert quorum_shortfall(["m1", "m3", "m4"], enabled, half) is None
    assert quorum_shortfall(["m2", "m3"], enabled, half) is None  # exactly 0.5
    short = quorum_shortfall(["m3", "m4"], enabled, half)
    assert short is not None and "30%" in short and "50%" in short
    assert quorum_shortfall([], enabled, half) is not None
    two = Quorum(min_weight_fraction=0.1, min_votes=2)
    message = quorum_shortfall(["m1"], enabled, two)
    assert message is not None and "at least 2" in message
    assert quorum_shortfall(["m1", "unknown"], enabled, two) is not None
    # A shadow endpoint (weight 0) is combined with nothing: its vote is not a second one.
    assert quorum_shortfall(["m1", "shadow"], enabled | {"shadow": 0.0}, two) is not None


SETTINGS = Adaptive(metric="brier", half_life_outcomes=1.0, min_outcomes=1.6, floor=0.5, cap=1.5)


def test_adaptive_multiplier_neutral_until_enough_outcomes() -> None:
    assert adaptive_multiplier(0.01, 1.0, 1.5, SETTINGS) == 1.0
    assert adaptive_multiplier(0.20, 0.6, 1.6, SETTINGS) == pytest.approx(1.25)  # 0.25 / 0.20
    assert adaptive_multiplier(0.01, 1.0, 5.0, SETTINGS) == 1.5  # capped
    assert adaptive_multiplier(0.90, 0.0, 5.0, SETTINGS) == 0.5  # floored
    hit = Adaptive(metric="hit_rate", half_life_outcomes=10, min_outcomes=0, floor=0.1, cap=3)
    assert adaptive_multiplier(0.3, 0.7, 1.0, hit) == pytest.approx(1.4)


def test_adaptive_record_decays_by_half_life() -> None:
    weights = AdaptiveWeights(SETTINGS)  # half-life 1 outcome: decay 0.5
    weights.record("a", 0.8, label=True)  # brier 0.04, hit
    weights.record("a", 0.8, label=False)  # brier 0.64, miss
    score = weights.score("a")
    # S = 0.5*0.04 + 0.64 = 0.66, W = 0.5 + 1 = 1.5 -> 0.44; hits: (0.5*1 + 0)/1.5 = 1/3
    assert score.effective_outcomes == pytest.approx(1.5)
    assert score.brier_score == pytest.approx(0.44)
    assert score.hit_rate == pytest.approx(1 / 3)
    assert score.multiplier == 1.0  # 1.5 effective outcomes < min 1.6
    weights.record("a", 0.8, label=False)
    score = weights.score("a")
    # S = 0.5*0.66 + 0.64 = 0.97, W = 0.5*1.5 + 1 = 1.75 -> Brier 0.5543 -> 0.25/0.5543 = 0.45
    assert score.effective_outcomes == pytest.approx(1.75)
    assert score.brier_score == pytest.approx(0.97 / 1.75)
    assert score.multiplier == 0.5  # floored
    assert weights.score("never").multiplier == 1.0


def test_adaptive_weights_shift_the_decision() -> None:
    weights = AdaptiveWeights(
        Adaptive(metric="brier", half_life_outcomes=20, min_outcomes=3, floor=0.25, cap=2.0)
    )
    for _ in range(10):
        weights.record("good", 0.9, label=True)  # Brier 0.01 -> capped at 2
        weights.record("bad", 0.1, label=True)  # Brier 0.81 -> 0.309
    effective = weights.weights({"good": 1.0, "bad": 1.0})
    assert effective["good"] == pytest.approx(2.0)
    assert effective["bad"] == pytest.approx(0.25 / 0.81)
    static = combine({"good": 0.9, "bad": 0.1}, {"good": 1.0, "bad": 1.0}, T)
    adaptive = combine({"good": 0.9, "bad": 0.1}, effective, T)
    assert static.probability == pytest.approx(0.5) and static.signal is Signal.HOLD
    expected = (2.0 * 0.9 + 0.25 / 0.81 * 0.1) / (2.0 + 0.25 / 0.81)
    assert adaptive.probability == pytest.approx(expected)
    assert adaptive.signal is Signal.BUY


def test_the_largest_weights_the_config_accepts_combine_to_a_finite_vote() -> None:
    """Endpoint weight and adaptive cap are each at most ``MAX_WEIGHT``: 64 voters at both
    limits still sum without overflow (two configured weights of 1e308 raised OverflowError)."""
    largest = MAX_WEIGHT * MAX_WEIGHT
    votes = {f"m{i}": (i % 10) / 10 for i in range(64)}
    decision = combine(votes, dict.fromkeys(votes, largest), T)
    assert decision.probability == pytest.approx(sum(votes.values()) / 64, abs=1e-12)
    with pytest.raises(OverflowError):  # what the bound keeps out
        combine({"a": 0.6, "b": 0.8}, {"a": 1e308, "b": 1e308}, T)
