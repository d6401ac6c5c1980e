"""xylen coordinator: one weighted ensemble decision from many model servers, within a deadline.

The library API: :class:`AsyncCoordinator` (asyncio: ``predict``, ``feedback``, ``reload``,
``endpoints``), :class:`Coordinator` (the same, synchronous), :class:`ModelClient` (one model
server, blocking), :func:`load_config` / :class:`Config`, the results, and :func:`combine`, the
pure ensemble arithmetic.

The modules:

* ``config`` -- config.yaml read and validated into one frozen :class:`Config`.
* ``endpoints`` -- one model server: its channel, health watch and PredictStream.
* ``replicas`` -- one model (one vote): its replicas (listed, or what its host resolves to),
  one ``endpoints`` client each, requests spread round robin over the SERVING ones.
* ``featurize`` -- candle windows turned into features once, for servers that compute the same.
* ``fanout`` -- one request to every serving endpoint under one deadline; who voted, who not.
* ``trust`` -- pure: whether an answer can be counted (probability range, model name, version).
* ``breaker`` -- outlier detection: eject a server that stops answering, probe it, let it back.
* ``metrics`` -- per-endpoint counters: votes, missing votes by reason, ejections, rejoins.
* ``ensemble`` -- pure arithmetic: combine votes, the quorum rule, adaptive weights.
* ``decision`` -- pure: one row's votes to its decision, every vote explained.
* ``feedback`` -- the feedback path: predictions remembered, outcomes validated, scored, queued.
* ``outbox`` -- the SQLite outbox of outcomes and the forwarder that delivers them.
* ``results`` -- what the library returns: plain frozen dataclasses.
* ``report`` -- results as text for the CLI and the demo.
* ``coordinator`` -- :class:`AsyncCoordinator`, the asyncio library that ties them together.
* ``client`` -- :class:`Coordinator`, the synchronous library on a background event loop.
* ``model_client`` -- :class:`ModelClient`, a small blocking client of one model server.
* ``convert`` -- results as EnsembleService protobuf messages.
* ``servicer`` -- the EnsembleService gRPC handlers.
* ``undecodable`` -- request bytes that do not parse: INVALID_ARGUMENT, not UNKNOWN.
* ``server`` -- the gRPC server: health, reflection, SIGHUP reload, graceful SIGTERM.
* ``telemetry`` -- its metrics (``/metrics``, ``/health``), imported only when it serves.
* ``candles`` -- kline files read into candle columns (CLI and demo only; needs polars).
* ``__main__`` -- the ``xylen-coordinator`` command: ``serve`` and ``predict``.
"""

from xylen_coordinator.client import Coordinator
from xylen_coordinator.config import Config, ConfigError, load_config
from xylen_coordinator.coordinator import AsyncCoordinator
from xylen_coordinator.ensemble import Decision, Signal, combine
from xylen_coordinator.model_client import ModelCallError, ModelClient
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
    "ModelCallError",
    "ModelClient",
    "RowDecision",
    "Signal",
    "VoteInfo",
    "combine",
    "describe_missing",
    "load_config",
]
