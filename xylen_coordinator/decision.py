"""One row's decision from its votes: the servers' answers on one input row, weighed and combined
into a :class:`~xylen_coordinator.results.RowDecision` with every vote explained.

Pure (no gRPC calls, no I/O, no asyncio): the coordinator fans out, checks the quorum and then
calls :func:`decide` once per row; tests check it by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator.config import Thresholds
from xylen_coordinator.ensemble import AdaptiveScore, NoVotes, combine
from xylen_coordinator.results import RowDecision, VoteInfo
from xylen_server.errors import Unavailable
from xylen_server.signals import FROM_PROTO, Signal


@dataclass(frozen=True)
class Vote:
    """One server's answer on one row."""

    prediction: pb.Prediction
    latency_seconds: float
    """Round trip of the server's answer as the coordinator saw it."""


def decide(
    prediction_id: str,
    votes: Mapping[str, Vote],
    weights: Mapping[str, float],
    configured_weights: Mapping[str, float],
    thresholds: Thresholds,
    scores: Mapping[str, AdaptiveScore] | None = None,
    left_out: Mapping[str, str] | None = None,
) -> RowDecision:
    """The ensemble's decision ``prediction_id`` on one row from ``votes`` (voter name -> vote,
    in the order they are reported).

    ``weights`` are the weights in force (the configured ones, times each model's multiplier in
    adaptive mode), ``configured_weights`` the configured ones and ``scores`` each voter's
    adaptive record (adaptive mode only). A vote whose own signal is unspecified or unknown
    reads as HOLD. ``left_out`` names the voters whose probability means something else (weight
    0 in ``weights``) with the reason their vote reports (:func:`~xylen_coordinator.ensemble.
    label_plan`). Raises :class:`~xylen_server.errors.Unavailable` (reason ``NO_QUORUM``)
    when no voter has a positive weight.
    """
    probabilities = {name: vote.prediction.probability_up for name, vote in votes.items()}
    try:
        decision = combine(probabilities, weights, thresholds)
    except NoVotes:
        raise Unavailable(
            "every server that voted has weight 0; no decision",
            reason="NO_QUORUM",
            voted=",".join(votes),
        ) from None
    return RowDecision(
        prediction_id=prediction_id,
        probability=decision.probability,
        signal=decision.signal,
        disagreement=decision.disagreement,
        votes=tuple(
            VoteInfo(
                server_name=name,
                probability=vote.prediction.probability_up,
                signal=FROM_PROTO.get(vote.prediction.signal, Signal.HOLD),
                normalized_weight=decision.weights[name],
                weight=weights[name],
                configured_weight=configured_weights[name],
                model_name=vote.prediction.model_name,
                model_version=vote.prediction.model_version,
                model_prediction_id=vote.prediction.prediction_id,
                latency_seconds=vote.latency_seconds,
                adaptive=None if scores is None else scores[name],
                left_out=(left_out or {}).get(name, ""),
            )
            for name, vote in votes.items()
        ),
        buy_threshold=thresholds.buy,
        sell_threshold=thresholds.sell,
    )
