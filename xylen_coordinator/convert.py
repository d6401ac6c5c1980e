"""Library results as EnsembleService protobuf messages (what the servicer answers)."""

from __future__ import annotations

from xylen.v1 import ensemble_service_pb2 as epb
from xylen_coordinator.config import Config
from xylen_coordinator.endpoints import MissingReason
from xylen_coordinator.ensemble import AdaptiveScore
from xylen_coordinator.results import EndpointState, EnsembleResult, FeedbackAck
from xylen_server.signals import TO_PROTO

MISSING_REASONS = {
    MissingReason.NOT_SERVING: epb.MISSING_REASON_NOT_SERVING,
    MissingReason.DEADLINE_EXCEEDED: epb.MISSING_REASON_DEADLINE_EXCEEDED,
    MissingReason.UNAVAILABLE: epb.MISSING_REASON_UNAVAILABLE,
    MissingReason.ERROR: epb.MISSING_REASON_ERROR,
    MissingReason.REJECTED: epb.MISSING_REASON_REJECTED,
    MissingReason.EJECTED: epb.MISSING_REASON_EJECTED,
}
WEIGHT_MODES = {"static": epb.WEIGHT_MODE_STATIC, "adaptive": epb.WEIGHT_MODE_ADAPTIVE}


def adaptive_proto(score: AdaptiveScore) -> epb.AdaptiveWeight:
    return epb.AdaptiveWeight(
        metric=score.metric,
        brier_score=score.brier_score,
        hit_rate=score.hit_rate,
        effective_outcomes=score.effective_outcomes,
        multiplier=score.multiplier,
    )


def predict_response(result: EnsembleResult) -> epb.EnsembleServicePredictResponse:
    response = epb.EnsembleServicePredictResponse(weight_mode=WEIGHT_MODES[result.weight_mode])
    for row in result.rows:
        prediction = response.predictions.add(
            prediction_id=row.prediction_id,
            probability_up=row.probability,
            signal=TO_PROTO[row.signal],
            disagreement=row.disagreement,
            buy_threshold=row.buy_threshold,
            sell_threshold=row.sell_threshold,
        )
        for vote in row.votes:
            message = prediction.votes.add(
                server_name=vote.server_name,
                probability_up=vote.probability,
                signal=TO_PROTO[vote.signal],
                normalized_weight=vote.normalized_weight,
                weight=vote.weight,
                configured_weight=vote.configured_weight,
                model_name=vote.model_name,
                model_version=vote.model_version,
                model_prediction_id=vote.model_prediction_id,
                left_out_reason=vote.left_out,
            )
            message.latency.FromNanoseconds(int(vote.latency_seconds * 1e9))
            if vote.adaptive is not None:
                message.adaptive.CopyFrom(adaptive_proto(vote.adaptive))
    for missing in result.missing:
        response.missing_votes.add(
            server_name=missing.server_name,
            reason=MISSING_REASONS[missing.reason],
            message=missing.message,
            error_reason=missing.error_reason,
        )
    response.duration.FromNanoseconds(int(result.duration_seconds * 1e9))
    return response


def feedback_response(ack: FeedbackAck) -> epb.EnsembleServiceFeedbackResponse:
    response = epb.EnsembleServiceFeedbackResponse(
        prediction_id=ack.prediction_id, duplicate=ack.duplicate, forward_to=ack.forward_to
    )
    response.forward_time.FromDatetime(ack.forward_time)
    return response


def info_response(
    config: Config, endpoints: list[EndpointState], pending: int
) -> epb.GetEnsembleInfoResponse:
    response = epb.GetEnsembleInfoResponse(
        weight_mode=WEIGHT_MODES[config.weights.mode],
        buy_threshold=config.thresholds.buy,
        sell_threshold=config.thresholds.sell,
        threshold_source=config.thresholds.source,
        quorum_weight_fraction=config.quorum.min_weight_fraction,
        quorum_min_votes=config.quorum.min_votes,
        pending_feedback=pending,
    )
    response.deadline.FromNanoseconds(int(config.deadline_ms * 1e6))
    for state in endpoints:
        info = response.endpoints.add(
            name=state.name,
            address=state.address,
            enabled=state.enabled,
            serving=state.serving,
            configured_weight=state.configured_weight,
            weight=state.weight,
        )
        if state.adaptive is not None:
            info.adaptive.CopyFrom(adaptive_proto(state.adaptive))
        info.ejected = state.ejected
        if state.counts is not None:
            counters = info.counters
            counters.votes = state.counts.votes
            counters.missing_votes.update(state.counts.missing)
            counters.rejected_votes.update(state.counts.rejected)
            counters.ejections = state.counts.ejections
            counters.rejoins = state.counts.rejoins
        if state.signal_validation is not None:
            info.signal_validation.CopyFrom(state.signal_validation.proto())
    return response
