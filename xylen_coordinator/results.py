"""What the coordinator library returns: plain frozen dataclasses, no protobuf required."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from xylen_coordinator.endpoints import MissingReason
from xylen_coordinator.ensemble import AdaptiveScore, Signal
from xylen_coordinator.fanout import Missing
from xylen_coordinator.metrics import EndpointCounts
from xylen_server.signals import SignalValidation

__all__ = [
    "EndpointState",
    "EnsembleResult",
    "FeedbackAck",
    "Missing",
    "MissingReason",
    "RowDecision",
    "VoteInfo",
]


@dataclass(frozen=True)
class VoteInfo:
    """One server's vote on one row."""

    server_name: str
    probability: float
    """The server's up-probability."""
    signal: Signal
    """The server's own signal (its own thresholds)."""
    normalized_weight: float
    """Share of the decision, over this call's voters (a row's shares sum to 1)."""
    weight: float
    """Weight before normalisation (configured x adaptive multiplier)."""
    configured_weight: float
    model_name: str
    model_version: int
    model_prediction_id: str
    """The server's own prediction id."""
    latency_seconds: float
    """Round trip of this server's answer as the coordinator saw it."""
    adaptive: AdaptiveScore | None
    """Why the weight is what it is (adaptive mode only)."""
    left_out: str = ""
    """Why this vote was not combined (its probability means something else), or empty."""


@dataclass(frozen=True)
class RowDecision:
    """The ensemble's answer for one input row."""

    prediction_id: str
    """Ensemble prediction id: pass it to ``feedback``."""
    probability: float
    signal: Signal
    disagreement: float
    """Weighted standard deviation of the votes (0 = unanimous, at most 0.5)."""
    votes: tuple[VoteInfo, ...]
    buy_threshold: float = 0.55
    """The threshold :attr:`signal` was decided with (see ``thresholds.source``)."""
    sell_threshold: float = 0.45


@dataclass(frozen=True)
class EnsembleResult:
    """The answer to one ensemble predict call."""

    rows: tuple[RowDecision, ...]
    missing: tuple[Missing, ...]
    """Enabled servers that did not vote, and why (the same for every row)."""
    weight_mode: str
    """``static`` or ``adaptive``."""
    duration_seconds: float

    @property
    def voters(self) -> tuple[str, ...]:
        """Names of the servers that voted."""
        return tuple(v.server_name for v in self.rows[0].votes) if self.rows else ()

    @property
    def decision(self) -> RowDecision:
        """The last row's decision (the usual single-row case)."""
        return self.rows[-1]


@dataclass(frozen=True)
class FeedbackAck:
    """An outcome is on the coordinator's disk."""

    prediction_id: str
    duplicate: bool
    """An outcome for this prediction was already recorded; nothing was queued twice."""
    forward_to: tuple[str, ...]
    forward_time: datetime
    """Earliest forwarding time (UTC)."""
    not_forwarded: Mapping[str, str] = field(default_factory=dict)
    """Voters the outcome is not forwarded to, with the reason (``HORIZON_MISMATCH``,
    ``HORIZON_UNKNOWN``: :mod:`xylen_coordinator.feedback`)."""


@dataclass(frozen=True)
class EndpointState:
    """A configured endpoint as the coordinator sees it now."""

    name: str
    address: str
    enabled: bool
    serving: bool
    health_detail: str
    configured_weight: float
    weight: float
    adaptive: AdaptiveScore | None
    sends_features: bool = False
    """True when the server computes this coordinator's features, so candle windows reach it
    as feature vectors computed once here."""
    ejected: bool = False
    """Outlier detection has taken it out of the ensemble for now."""
    counts: EndpointCounts | None = None
    """Its votes, missing votes, ejections and rejoins since the coordinator started."""
    signal_validation: SignalValidation | None = None
    """What its model's own thresholds did on their validation bars, net of the fee (its
    GetModelInfo's ``signal_validation``, as last learned); None while unknown or unrecorded."""
