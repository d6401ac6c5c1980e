"""What the coordinator exports on its metrics port (``xylen-coordinator serve
--metrics-port``, default 9000): the fan-out as the coordinator sees it, and the feedback path.

=============================================== ============================================
``xylen_coordinator_predictions_total``          ensemble calls fanned out (``outcome``: ok,
                                                 no_quorum, refused)
``xylen_coordinator_predict_duration_seconds``   one ensemble call, fan-out to decision
``xylen_coordinator_endpoint_duration_seconds``  each server's round trip (``endpoint``)
``xylen_coordinator_missing_votes_total``        votes missing by ``endpoint`` and ``reason``
``xylen_coordinator_ejections_total``            outlier detection's ejections by ``endpoint``
``xylen_coordinator_decisions_total``            decided rows by ``signal``
``xylen_coordinator_disagreement``               histogram of the votes' weighted spread
``xylen_coordinator_weight``                     the weight each ``endpoint`` gets now
``xylen_coordinator_endpoint_serving``           1 while an ``endpoint``'s health is SERVING
``xylen_coordinator_feedback_queue_depth``       outcomes not yet delivered to every server
``xylen_coordinator_feedback_retries_total``     deliveries that failed and were rescheduled
``xylen_coordinator_feedback_not_forwarded_total`` outcomes not forwarded to an ``endpoint``, by
                                                 ``reason`` (HORIZON_MISMATCH, HORIZON_UNKNOWN)
``xylen_coordinator_outbox_failures_total``      failed uses of the outbox (a full disk;
                                                 retried), by ``part``: prediction_log,
                                                 feedback_forwarding, retention_sweep
``xylen_coordinator_outbox_pruned_total``        rows the retention sweep deleted from the
                                                 outbox, by ``table``: predictions, outcomes,
                                                 deliveries (``feedback_queue.retention_seconds``)
``xylen_coordinator_feedback_refused_total``     outcomes an ``endpoint`` refused for good, by
                                                 ``code`` (INVALID_ARGUMENT, NOT_FOUND, ...): not
                                                 retried
``xylen_coordinator_feedback_abandoned_total``   deliveries to an ``endpoint`` abandoned: it was
                                                 not configured for longer than the retention
=============================================== ============================================

Plus the process series of :class:`~xylen_server.telemetry.Meters`. The coordinator library
calls :meth:`CoordinatorTelemetry.fanned` and :meth:`~CoordinatorTelemetry.decided` through its
``observer`` attribute; nothing here is imported unless the coordinator serves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

from xylen_coordinator.coordinator import AsyncCoordinator
from xylen_coordinator.fanout import FanOutResult
from xylen_coordinator.feedback import PRUNED_TABLES
from xylen_coordinator.outbox import PERMANENT_CODES
from xylen_coordinator.results import EnsembleResult
from xylen_server.telemetry import Meters


class CoordinatorTelemetry:
    """The coordinator's meters; set as ``coordinator.observer``."""

    def __init__(self, coordinator: AsyncCoordinator) -> None:
        self.coordinator = coordinator
        self.meters = Meters("xylen-coordinator")
        meter = self.meters.meter
        self._predictions = meter.create_counter(
            "xylen.coordinator.predictions", description="Ensemble calls fanned out, by outcome."
        )
        self._duration = meter.create_histogram(
            "xylen.coordinator.predict.duration",
            unit="s",
            description="One ensemble call, from the fan-out to the decision.",
        )
        self._endpoint = meter.create_histogram(
            "xylen.coordinator.endpoint.duration",
            unit="s",
            description="Each server's round trip as the coordinator saw it.",
        )
        meter.create_observable_counter(
            "xylen.coordinator.missing_votes",
            [self._missing],
            description="Votes missing from ensemble calls, by endpoint and reason.",
        )
        meter.create_observable_counter(
            "xylen.coordinator.feedback_not_forwarded",
            [self._not_forwarded],
            description="Outcomes not forwarded to an endpoint whose label horizon differs.",
        )
        meter.create_observable_counter(
            "xylen.coordinator.ejections",
            [self._ejections],
            description="Times outlier detection ejected an endpoint.",
        )
        self._decisions = meter.create_counter(
            "xylen.coordinator.decisions", description="Decided rows by signal."
        )
        self._disagreement = meter.create_histogram(
            "xylen.coordinator.disagreement",
            description="Weighted standard deviation of the votes of a row (0: unanimous).",
        )
        meter.create_observable_gauge(
            "xylen.coordinator.weight",
            [self._weights],
            description="The weight each endpoint gets now (configured x adaptive).",
        )
        meter.create_observable_gauge(
            "xylen.coordinator.endpoint.serving",
            [self._serving],
            description="1 while the endpoint's health is SERVING.",
        )
        meter.create_observable_gauge(
            "xylen.coordinator.feedback.queue_depth",
            [self._queue_depth],
            description="Outcomes not yet delivered to every server.",
        )
        meter.create_observable_counter(
            "xylen.coordinator.feedback.retries",
            [self._retries],
            description="Feedback deliveries that failed and were rescheduled.",
        )
        meter.create_observable_counter(
            "xylen.coordinator.outbox.failures",
            [self._outbox_failures],
            description="Failed uses of the outbox (a full disk; retried), by part.",
        )
        meter.create_observable_counter(
            "xylen.coordinator.outbox.pruned",
            [self._pruned],
            description="Rows deleted from the outbox as older than its retention, by table.",
        )
        meter.create_observable_counter(
            "xylen.coordinator.feedback.refused",
            [self._refused],
            description="Outcomes a model server refused for good (not retried), by code.",
        )
        meter.create_observable_counter(
            "xylen.coordinator.feedback.abandoned",
            [self._abandoned],
            description="Deliveries abandoned: their server was not configured for longer than "
            "the outbox's retention.",
        )
        self.pending = 0
        """Queue depth, refreshed on the loop before every scrape (:meth:`refresh`)."""
        self._endpoint_attributes: dict[str, dict[str, str]] = {}

    def _attributes(self, name: str) -> Mapping[str, str]:
        found = self._endpoint_attributes.get(name)
        if found is None:
            found = self._endpoint_attributes[name] = {"endpoint": name}
        return found

    # -- called by the coordinator ---------------------------------------------------------

    def fanned(self, fanned: FanOutResult, outcome: str) -> None:
        """One fan-out: every answer's round trip, every missing vote, and how it ended."""
        self._predictions.add(1, {"outcome": outcome})
        for name, answer in fanned.answers.items():
            self._endpoint.record(answer.latency, self._attributes(name))

    def decided(self, result: EnsembleResult) -> None:
        self._duration.record(result.duration_seconds)
        for row in result.rows:
            self._decisions.add(1, {"signal": str(row.signal)})
            self._disagreement.record(row.disagreement)

    # -- observed ----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read what needs the loop (the outbox's queue) before a scrape."""
        # A closed or missing outbox keeps the last figure.
        with contextlib.suppress(Exception):
            self.pending = await self.coordinator.pending_feedback()

    def _missing(self, _options: CallbackOptions) -> Iterable[Observation]:
        """From the coordinator's own per-endpoint counters (:mod:`xylen_coordinator.metrics`)."""
        metrics = self.coordinator.metrics
        return [
            Observation(n, {"endpoint": e.name, "reason": reason})
            for e in self.coordinator.endpoints()
            for reason, n in metrics.counts(e.name).missing.items()
        ]

    def _not_forwarded(self, _options: CallbackOptions) -> Iterable[Observation]:
        metrics = self.coordinator.metrics
        return [
            Observation(n, {"endpoint": e.name, "reason": reason})
            for e in self.coordinator.endpoints()
            for reason, n in metrics.counts(e.name).feedback_not_forwarded.items()
        ]

    def _ejections(self, _options: CallbackOptions) -> Iterable[Observation]:
        metrics = self.coordinator.metrics
        return [
            Observation(metrics.counts(e.name).ejections, self._attributes(e.name))
            for e in self.coordinator.endpoints()
        ]

    def _weights(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(e.weight, self._attributes(e.name))
            for e in self.coordinator.endpoints()
            if e.enabled
        ]

    def _serving(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(1 if e.serving else 0, self._attributes(e.name))
            for e in self.coordinator.endpoints()
            if e.enabled
        ]

    def _queue_depth(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.pending)]

    def _retries(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.coordinator.delivery_retries())]

    def _outbox_failures(self, _options: CallbackOptions) -> Iterable[Observation]:
        # Both parts from 0, so an alert's increase() counts the first failures too.
        counts = {"prediction_log": 0, "feedback_forwarding": 0, "retention_sweep": 0}
        counts.update(self.coordinator.metrics.outbox_failures())
        return [Observation(n, {"part": part}) for part, n in counts.items()]

    def _pruned(self, _options: CallbackOptions) -> Iterable[Observation]:
        # Every table from 0, as the failures.
        counts = dict.fromkeys(PRUNED_TABLES, 0)
        counts.update(self.coordinator.metrics.pruned_rows())
        return [Observation(n, {"table": table}) for table, n in counts.items()]

    def _refused(self, _options: CallbackOptions) -> Iterable[Observation]:
        # Every configured endpoint and permanent code from 0, as the failures.
        counts = {
            (e.name, code.name): 0 for e in self.coordinator.endpoints() for code in PERMANENT_CODES
        }
        counts.update(self.coordinator.metrics.refusals())
        return [
            Observation(n, {"endpoint": name, "code": code}) for (name, code), n in counts.items()
        ]

    def _abandoned(self, _options: CallbackOptions) -> Iterable[Observation]:
        # Every configured endpoint from 0: the one counted next is one configured before.
        counts = {e.name: 0 for e in self.coordinator.endpoints()}
        counts.update(self.coordinator.metrics.abandoned_deliveries())
        return [Observation(n, self._attributes(name)) for name, n in counts.items()]

    def health(self) -> tuple[Mapping[str, Any], bool]:
        """``/health``: SERVING with the endpoints that are."""
        endpoints = [e for e in self.coordinator.endpoints() if e.enabled]
        serving = [e.name for e in endpoints if e.serving]
        payload = {
            "status": "SERVING" if serving else "NOT_SERVING",
            "endpoints": {e.name: "SERVING" if e.serving else "NOT_SERVING" for e in endpoints},
            "feedback_pending": self.pending,
        }
        return payload, bool(serving)
