"""The coordinator as an asyncio library: :class:`AsyncCoordinator`.

It fans each request out, checks the quorum and decides each row
(:func:`~xylen_coordinator.decision.decide`); outcomes go through its
:class:`~xylen_coordinator.feedback.Ledger`; a reload swaps configuration and clients.

It is what the gRPC ``EnsembleService`` serves, what the CLI drives and
what a Python trading service can embed directly (no coordinator process in between)::

    async with AsyncCoordinator("config.yaml") as coordinator:
        result = await coordinator.predict([window])      # EnsembleResult
        ack = await coordinator.feedback(result.decision.prediction_id, realized_return=0.01)

Every call reads one snapshot of the configuration and the endpoint clients, so a reload swaps
both atomically and calls in flight finish on what they started with; clients that a reload
removes are closed only after a grace period longer than any deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator.config import MAX_TIMEOUT_SECONDS, Config, load_config
from xylen_coordinator.decision import Vote, decide
from xylen_coordinator.ensemble import (
    AdaptiveWeights,
    label_plan,
    member_thresholds,
    quorum_shortfall,
)
from xylen_coordinator.fanout import FanOutResult, fan_out
from xylen_coordinator.featurize import FEATURES_HASH, featurized
from xylen_coordinator.feedback import Ledger
from xylen_coordinator.metrics import Metrics
from xylen_coordinator.replicas import ReplicaSet
from xylen_coordinator.report import describe_missing
from xylen_coordinator.results import EndpointState, EnsembleResult, FeedbackAck, RowDecision
from xylen_server import clock, telemetry
from xylen_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XylenError,
)
from xylen_server.signals import SignalValidation

logger = logging.getLogger(__name__)

#: Most inputs in one call: the model servers' own default MAX_BATCH_ROWS.
MAX_BATCH_INPUTS = 4096

#: Status codes a server refuses a call with (the request itself, or the server's load): passed
#: through, with the server's reason, when every server that answered refused it. A server
#: shedding load (RESOURCE_EXHAUSTED, reason OVERLOADED) stays RESOURCE_EXHAUSTED, which
#: callers retry with backoff, not INVALID_ARGUMENT, which they must not retry.
_CLIENT_ERRORS: dict[str, type[XylenError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "NOT_FOUND": NotFound,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "OUT_OF_RANGE": InvalidArgument,
}


@dataclass(frozen=True)
class _Snapshot:
    """The configuration and the clients of its enabled endpoints, swapped as one."""

    config: Config
    clients: Mapping[str, ReplicaSet]
    """Enabled endpoints only, in configuration order."""

    @property
    def configured_weights(self) -> dict[str, float]:
        return {e.name: e.weight for e in self.config.enabled_endpoints}


class AsyncCoordinator:
    """Weighted ensemble over the configured model servers (asyncio)."""

    def __init__(self, config: Config | str | Path) -> None:
        self._initial = config if isinstance(config, Config) else load_config(config)
        self._snapshot: _Snapshot | None = None
        self.adaptive = AdaptiveWeights(self._initial.weights.adaptive)
        self.metrics = Metrics()
        """Votes, missing votes by reason, ejections and rejoins, by endpoint."""
        self._ledger = Ledger(self.adaptive, self.metrics)
        self._retiring: set[asyncio.Task[None]] = set()
        self._retiring_clients: list[ReplicaSet] = []
        self._reload_lock = asyncio.Lock()
        self._id_prefix = os.urandom(5).hex()
        self._ids = itertools.count(1)
        self._started = False
        self.observer: Any = None
        """Told about every fan-out and decision (``fanned(result, outcome)``,
        ``decided(result)``): the metrics of ``xylen-coordinator serve``; None: nobody."""

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self._snapshot.config if self._snapshot else self._initial

    async def start(self, wait_seconds: float = 3.0) -> AsyncCoordinator:
        """Open the channels and the outbox; wait up to ``wait_seconds`` for every
        endpoint's first health status (an unreachable one counts as known: not serving)."""
        if self._started:
            return self
        self._started = True
        config = self._initial
        self._snapshot = _Snapshot(config, self._make_clients(config, {}))
        try:
            await self._ledger.open(config.feedback_queue, self._current_clients)
        except BaseException:  # e.g. another coordinator holds the outbox: nothing left open
            await self.close()
            raise
        await self.wait_health_known(wait_seconds)
        return self

    async def __aenter__(self) -> AsyncCoordinator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop forwarding, write the prediction log, close every channel."""
        if not self._started:
            return
        self._started = False
        await self._ledger.close()
        for task in list(self._retiring):
            task.cancel()
        clients = list(self._snapshot.clients.values()) if self._snapshot else []
        retiring, self._retiring_clients = self._retiring_clients, []
        for client in clients + retiring:
            await client.close(grace=0.5)

    def _make_clients(
        self, config: Config, reuse: Mapping[str, ReplicaSet]
    ) -> dict[str, ReplicaSet]:
        clients: dict[str, ReplicaSet] = {}
        for endpoint in config.enabled_endpoints:
            old = reuse.get(endpoint.name)
            if (
                old is not None
                and old.endpoint.address == endpoint.address
                and old.endpoint.replicas == endpoint.replicas
                and old.transport == config.transport
                and old.tls == config.tls.client()
                and old.token == config.auth.token
            ):
                old.endpoint = endpoint  # new weight or other attributes, same connection
                old.set_outlier_detection(config.outlier_detection)
                clients[endpoint.name] = old
            else:
                client = ReplicaSet(
                    endpoint,
                    config.transport,
                    config.tls.client(),
                    config.auth.token,
                    outlier_detection=config.outlier_detection,
                    metrics=self.metrics,
                )
                client.start()
                clients[endpoint.name] = client
        return clients

    def _current_clients(self) -> Mapping[str, ReplicaSet]:
        return self._snapshot.clients if self._snapshot else {}

    async def wait_health_known(self, timeout: float) -> None:
        """Wait until every enabled endpoint has reported a health status (or ``timeout``)."""
        clients = list(self._current_clients().values())
        waits = [asyncio.ensure_future(c.health_known.wait()) for c in clients]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for task in pending:
                task.cancel()

    async def wait_serving(self, names: Sequence[str] | None = None, timeout: float = 30.0) -> bool:
        """Wait until the named enabled endpoints (default: all) are SERVING; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            clients = self._current_clients()
            wanted = list(clients) if names is None else list(names)
            if all(name in clients and clients[name].serving for name in wanted):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def reload(self, config: Config | str | Path | None = None) -> Config:
        """Swap in a new configuration (default: re-read the file the current one came from).

        The new configuration is validated first (:class:`~xylen_coordinator.config.ConfigError`
        leaves the old one in force). Endpoints are matched by name: new ones connect, removed
        ones are closed after every call that may still use them has finished, and changed
        weights apply to the next call. ``feedback_queue``'s retention applies from the next
        sweep, its backoff and call timeout from the next delivery; its ``path`` only after a
        restart (logged).
        """
        async with self._reload_lock:
            current = self._snapshot
            if current is None:
                raise FailedPrecondition("the coordinator is not started", reason="NOT_STARTED")
            if config is None:
                if current.config.source is None:
                    raise FailedPrecondition(
                        "the configuration was not read from a file", reason="NO_CONFIG_FILE"
                    )
                config = current.config.source
            new = config if isinstance(config, Config) else load_config(config)
            if new.feedback_queue.path != current.config.feedback_queue.path:
                logger.warning("feedback_queue.path changes take effect after a restart")
            self._ledger.reconfigure(new.feedback_queue)
            clients = self._make_clients(new, current.clients)
            self._snapshot = _Snapshot(new, clients)
            self.adaptive.reconfigure(new.weights.adaptive)
            kept = {id(c) for c in clients.values()}
            grace = 2 * new.deadline_ms / 1000 + 1.0
            for client in current.clients.values():
                if id(client) not in kept:
                    self._retire(client, grace)
            added = sorted(set(clients) - set(current.clients))
            removed = sorted(set(current.clients) - set(clients))
            logger.info(
                "configuration reloaded: %d enabled endpoints (added %s, removed %s)",
                len(clients),
                ", ".join(added) or "none",
                ", ".join(removed) or "none",
            )
            if added:
                await self.wait_health_known(2.0)
            return new

    def _retire(self, client: ReplicaSet, grace: float) -> None:
        self._retiring_clients.append(client)

        async def retire() -> None:
            await asyncio.sleep(grace)
            await client.close(grace=0.5)
            with contextlib.suppress(ValueError):
                self._retiring_clients.remove(client)

        task = asyncio.create_task(retire(), name=f"retire-{client.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- predict ----------------------------------------------------------------------------

    def _weights(self, snapshot: _Snapshot) -> dict[str, float]:
        configured = snapshot.configured_weights
        if snapshot.config.weights.mode == "adaptive":
            return self.adaptive.weights(configured)
        return configured

    async def predict(
        self,
        inputs: Sequence[pb.PredictInput] | pb.PredictRequest,
        timeout: float | None = None,
    ) -> EnsembleResult:
        """Ask every serving endpoint about ``inputs`` and combine the votes.

        ``timeout`` (seconds) bounds the whole fan-out; None uses ``deadline_ms``. Raises
        :class:`~xylen_server.errors.Unavailable` (reason ``NO_QUORUM``) when too few servers
        voted, :class:`~xylen_server.errors.InvalidArgument` for an empty batch; when every
        server that answered refused the call (the input, or their load), the first one's
        status and reason are passed on.
        """
        started = time.perf_counter()
        snapshot = self._snapshot
        if snapshot is None:
            raise FailedPrecondition("the coordinator is not started", reason="NOT_STARTED")
        config = snapshot.config
        request = (
            inputs if isinstance(inputs, pb.PredictRequest) else pb.PredictRequest(inputs=inputs)
        )
        if not request.inputs:
            raise InvalidArgument(
                "the batch is empty; send at least one input", reason="EMPTY_BATCH"
            )
        if len(request.inputs) > MAX_BATCH_INPUTS:
            raise ResourceExhausted(
                f"{len(request.inputs)} inputs in one call; at most {MAX_BATCH_INPUTS}",
                reason="BATCH_TOO_LARGE",
                limit=MAX_BATCH_INPUTS,
            )
        if timeout is not None and not (math.isfinite(timeout) and timeout <= MAX_TIMEOUT_SECONDS):
            raise InvalidArgument(
                f"timeout must be a finite number of seconds up to {MAX_TIMEOUT_SECONDS:g}, "
                f"got {timeout:.6g}",
                reason="INVALID_TIMEOUT",
            )
        budget = config.deadline_ms / 1000 if timeout is None or timeout <= 0 else timeout
        clients = list(snapshot.clients.values())
        # Windows become features once here when some server computes the same features.
        shared = [c.name for c in clients if c.features_hash == FEATURES_HASH]
        computed = featurized(request) if shared else None
        if telemetry.tracing_enabled():
            with telemetry.tracer(__name__).start_as_current_span("ensemble fan-out") as span:
                fanned = await fan_out(clients, request, budget, computed)
                span.set_attribute("xylen.voted", sorted(fanned.answers))
                for missing in fanned.missing:  # the missing votes, visible in the trace
                    span.add_event(
                        "missing vote",
                        {"xylen.endpoint": missing.server_name, "xylen.reason": missing.reason},
                    )
        else:
            fanned = await fan_out(clients, request, budget, computed)
        fanned_out = time.perf_counter()
        for name in fanned.answers:
            self.metrics.vote(name)
        for missing in fanned.missing:
            self.metrics.missing(
                missing.server_name, missing.reason.value, missing.error_reason, missing.message
            )
        configured = snapshot.configured_weights
        # Combine only probabilities that mean the same thing (label_plan), with thresholds
        # that follow the members' own (member_thresholds).
        if any(c.learning for c in clients):  # just turned SERVING: its label is on the way
            left = max(0.0, budget - (fanned_out - started))  # within the caller's budget
            await asyncio.gather(*(c.learnt(left) for c in clients))
        labels = {c.name: c.label for c in clients}
        ensemble_label, left_out = label_plan(labels, configured)
        observer = self.observer
        try:  # on the votes that are combined: a left-out vote is no part of the decision
            self._check_quorum(snapshot, fanned, left_out)
        except XylenError as exc:
            if observer is not None:
                observer.fanned(fanned, "no_quorum" if exc.reason == "NO_QUORUM" else "refused")
            raise
        if observer is not None:
            observer.fanned(fanned, "ok")
        for name, answer in fanned.answers.items():
            if answer.response.predictions:
                snapshot.clients[name].notice_version(answer.response.predictions[0].model_version)
        weights = self._weights(snapshot)
        weights = {name: 0.0 if name in left_out else w for name, w in weights.items()}
        if not any(weights.get(name, 0.0) > 0 for name in fanned.answers):
            raise Unavailable(
                "no decision: no server whose probability means what the ensemble's does voted"
                f" ({'; '.join(f'{n}: {r}' for n, r in left_out.items())[:400]})",
                reason="NO_QUORUM",
                voted=",".join(fanned.answers),
            )
        thresholds = config.thresholds
        if thresholds.source == "members":
            thresholds = member_thresholds(
                {name: weights.get(name, 0.0) for name in fanned.answers},
                {c.name: c.thresholds for c in clients},
                thresholds,
            )
        scores = None
        if config.weights.mode == "adaptive":
            scores = {name: self.adaptive.score(name) for name in configured}
        rows: list[RowDecision] = []
        now = clock.now_seconds()
        for i in range(len(request.inputs)):
            votes = {
                name: Vote(answer.response.predictions[i], answer.latency)
                for name, answer in fanned.answers.items()
            }
            row = decide(self._next_id(), votes, weights, configured, thresholds, scores, left_out)
            self._ledger.remember(
                row,
                now,
                *_row_features(request, computed, shared, i, clients),
                label=ensemble_label,
                labels=labels,
            )
            rows.append(row)
        result = EnsembleResult(
            rows=tuple(rows),
            missing=tuple(fanned.missing),
            weight_mode=config.weights.mode,
            duration_seconds=time.perf_counter() - started,
        )
        if observer is not None:
            observer.decided(result)
        return result

    def _next_id(self) -> str:
        return f"ens-{self._id_prefix}-{next(self._ids):x}"

    def _check_quorum(
        self, snapshot: _Snapshot, fanned: FanOutResult, left_out: Mapping[str, str]
    ) -> None:
        combined = [name for name in fanned.answers if name not in left_out]
        shortfall = quorum_shortfall(combined, snapshot.configured_weights, snapshot.config.quorum)
        if shortfall is None:
            return
        refused = [m for m in fanned.missing if m.code in _CLIENT_ERRORS]
        if (
            refused
            and not fanned.answers
            and len(refused) == len([m for m in fanned.missing if m.code])
        ):
            first = refused[0]
            raise _CLIENT_ERRORS[first.code](
                f"{first.server_name} refused the call: {first.message}",
                reason=first.error_reason or first.code,
                server=first.server_name,
            )
        raise Unavailable(
            f"no decision: {shortfall}. Missing: {describe_missing(fanned.missing)}",
            reason="NO_QUORUM",
            voted=",".join(fanned.answers) or "none",
            missing=",".join(m.server_name for m in fanned.missing),
        )

    # -- feedback ---------------------------------------------------------------------------

    async def feedback(
        self,
        prediction_id: str,
        outcome: pb.TradeOutcome | None = None,
        *,
        pnl: float = 0.0,
        realized_return: float | None = None,
        close_time: datetime | None = None,
        side: int = 0,
        underlying_log_return: float | None = None,
    ) -> FeedbackAck:
        """Record a trade's outcome for an ensemble prediction, durably, and queue it for every
        server that voted. Pass a ``TradeOutcome`` or its fields (``close_time`` defaults to
        now). A second outcome for the same prediction is acknowledged as a duplicate.
        """
        return await self._ledger.accept(
            prediction_id,
            outcome,
            self.config.retraining,
            pnl=pnl,
            realized_return=realized_return,
            close_time=close_time,
            side=side,
            underlying_log_return=underlying_log_return,
        )

    def delivery_retries(self) -> int:
        """Feedback deliveries that failed and were rescheduled since the start."""
        return self._ledger.delivery_retries()

    async def pending_feedback(self) -> int:
        """Outcomes not yet delivered to every target."""
        return await self._ledger.pending()

    async def delivery_states(self, prediction_id: str) -> dict[str, tuple[str, int, str]]:
        """Server name -> (state, attempts, last error) of one outcome's deliveries."""
        return await self._ledger.delivery_states(prediction_id)

    async def sweep_outbox(self, now: float | None = None) -> dict[str, int]:
        """Delete what is older than ``feedback_queue.retention_seconds`` from the outbox now
        (it is swept at start and every few minutes anyway); returns the rows deleted by table
        (:meth:`xylen_coordinator.feedback.Ledger.sweep`; ``now``: sweep as of that epoch
        second)."""
        return await self._ledger.sweep(now)

    # -- introspection ----------------------------------------------------------------------

    def endpoints(self) -> list[EndpointState]:
        """Every configured endpoint with its health and current weight."""
        snapshot = self._snapshot
        config = self.config
        clients = snapshot.clients if snapshot else {}
        adaptive = config.weights.mode == "adaptive"
        states = []
        for endpoint in config.model_endpoints:
            client = clients.get(endpoint.name)
            score = self.adaptive.score(endpoint.name) if adaptive else None
            states.append(
                EndpointState(
                    name=endpoint.name,
                    address=endpoint.address,
                    enabled=endpoint.enabled,
                    serving=bool(client and client.serving),
                    health_detail=client.health_detail if client else "disabled",
                    configured_weight=endpoint.weight,
                    weight=endpoint.weight * (score.multiplier if score else 1.0),
                    adaptive=score,
                    sends_features=bool(client and client.features_hash == FEATURES_HASH),
                    ejected=bool(client and client.breaker.ejected),
                    counts=self.metrics.counts(endpoint.name),
                    signal_validation=SignalValidation.from_model_info(
                        client.info if client else None
                    ),
                )
            )
        return states

    async def model_infos(self, timeout: float = 2.0) -> dict[str, pb.ModelInfo]:
        """GetModelInfo of every serving endpoint (the ones that answer)."""
        clients = [c for c in self._current_clients().values() if c.serving]
        results = await asyncio.gather(
            *(c.model_info(timeout) for c in clients), return_exceptions=True
        )
        return {
            c.name: r for c, r in zip(clients, results, strict=True) if isinstance(r, pb.ModelInfo)
        }


def _row_features(
    request: pb.PredictRequest,
    computed: pb.PredictRequest | None,
    shared: Sequence[str],
    row: int,
    clients: Sequence[ReplicaSet],
) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """The feature row ``row`` was predicted on and the servers it holds for: every server for a
    feature vector sent as such, the servers that were sent the coordinator's features for a
    window (none when no server computes the same features)."""
    item = request.inputs[row]
    if item.HasField("features"):
        return tuple(item.features.values), tuple(c.name for c in clients)
    if computed is not None:
        return tuple(computed.inputs[row].features.values), tuple(shared)
    return (), ()
