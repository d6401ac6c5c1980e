"""xylen coordinator: one weighted ensemble decision from many model servers, within a deadline.

The library API (see :mod:`xylen_coordinator.coordinator` and :mod:`xylen_coordinator.client`):

* :class:`AsyncCoordinator` -- asyncio: ``predict``, ``feedback``, ``reload``, ``endpoints``.
* :class:`Coordinator` -- the same, synchronous (its own event loop on a background thread).
* :func:`load_config` / :class:`Config` -- config.yaml, validated.
* :func:`combine` -- the pure ensemble arithmetic.
"""

from xylen_coordinator.client import Coordinator
from xylen_coordinator.config import Config, ConfigError, load_config
from xylen_coordinator.coordinator import AsyncCoordinator
from xylen_coordinator.ensemble import Decision, Signal, combine
from xylen_coordinator.report import describe_missing
from xylen_coordinator.results import (
    EndpointState,
    EnsembleResult,
    FeedbackAck,
    Missing,
    MissingReason,
    RowDecision,
    VoteInfo,
)

__all__ = [
    "AsyncCoordinator",
    "Config",
    "ConfigError",
    "Coordinator",
    "Decision",
    "EndpointState",
    "EnsembleResult",
    "FeedbackAck",
    "Missing",
    "MissingReason",
    "RowDecision",
    "Signal",
    "VoteInfo",
    "combine",
    "describe_missing",
    "load_config",
]
