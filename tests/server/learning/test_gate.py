"""The validation gate as a pure function, checked by hand (no files, no processes)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xylen_server.learning.gate import GateError, chance_auc, gate

Y = np.array([0] * 50 + [1] * 50)
COIN = np.full(100, 0.5)
#: 0.3 on every down row, 0.7 on every up row: separates perfectly.
SHARP = np.where(Y == 1, 0.7, 0.3)


def test_chance_bound_follows_the_mann_whitney_null():
    # SE^2 = (n + 1) / (12 n1 n0) = 101 / 30000
    assert chance_auc(Y, 1.645) == pytest.approx(0.5 + 1.645 * math.sqrt(101 / 30000))
    assert chance_auc(np.ones(10), 1.645) == 1.0  # one class: nothing can beat chance


def test_a_sharper_candidate_passes_with_both_scores_reported():
    verdict = gate(Y, COIN, SHARP, margin=0.002, min_auc=0.52, z=1.645)
    assert verdict.passed
    assert verdict.serving_log_loss == pytest.approx(math.log(2))
    assert verdict.candidate_log_loss == pytest.approx(-math.log(0.7))
    assert (verdict.serving_auc, verdict.candidate_auc) == (0.5, 1.0)
    assert verdict.min_auc == pytest.approx(chance_auc(Y, 1.645))  # above the configured 0.52
    assert verdict.holdout_samples == 100 and verdict.reason.startswith("candidate not worse")


def test_a_candidate_worse_on_log_loss_is_refused_even_with_a_perfect_auc():
    overconfident = np.where(Y == 1, 0.51, 0.49)  # AUC 1, but serving is sharper still
    verdict = gate(Y, SHARP, overconfident, margin=0.002, min_auc=0.52, z=1.645)
    assert not verdict.passed and verdict.candidate_auc == 1.0
    assert verdict.reason.startswith("candidate worse than the serving model")


def test_a_calibrated_candidate_that_learned_nothing_is_refused():
    # The serving model is confidently wrong half the time; a coin beats it on log loss.
    wrong = np.where(np.arange(100) % 2 == 0, 0.9, 0.1)
    verdict = gate(Y, wrong, COIN, margin=0.002, min_auc=0.52, z=1.645)
    assert verdict.candidate_log_loss < verdict.serving_log_loss
    assert not verdict.passed and verdict.reason.startswith("candidate learned too little")


def test_the_margin_lets_a_slightly_worse_candidate_through():
    nudged = np.clip(SHARP + np.where(Y == 1, -0.01, 0.01), 0, 1)
    loss = -math.log(0.69)
    assert not gate(Y, SHARP, nudged, margin=0.0, min_auc=0.5, z=1.645).passed
    verdict = gate(Y, SHARP, nudged, margin=0.02, min_auc=0.5, z=1.645)
    assert verdict.passed and verdict.candidate_log_loss == pytest.approx(loss)


def test_a_configured_minimum_above_chance_is_the_bar():
    verdict = gate(Y, COIN, SHARP, margin=0.002, min_auc=1.01, z=0.0)
    assert verdict.min_auc == 1.01 and not verdict.passed


def test_a_tiny_window_cannot_be_won_by_luck():
    y = np.array([0, 0, 1, 1])
    verdict = gate(y, np.full(4, 0.5), np.array([0.2, 0.4, 0.6, 0.8]), 0.002, 0.52, 1.645)
    assert verdict.candidate_auc == 1.0 and verdict.min_auc > 1.0 and not verdict.passed


@pytest.mark.parametrize(
    ("y", "candidate", "message"),
    [
        (np.ones(100), SHARP, "single class"),
        (Y, np.where(Y == 1, np.nan, 0.3), "non-finite"),
    ],
)
def test_windows_that_cannot_be_scored_are_errors(y, candidate, message):
    with pytest.raises(GateError, match=message):
        gate(y, COIN, candidate, margin=0.002, min_auc=0.52, z=1.645)


def test_the_verdict_has_the_contracts_fields():
    from xylen.v1 import model_service_pb2 as pb

    verdict = gate(Y, COIN, SHARP, margin=0.002, min_auc=0.52, z=1.645)
    assert pb.GateVerdict(**verdict.as_dict()).passed
