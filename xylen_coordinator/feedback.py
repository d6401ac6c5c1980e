"""The feedback path: from an ensemble prediction to its trade's outcome at every server that
voted on it and labels it the way it was trained.

:class:`Ledger` remembers each ensemble prediction (the latest in memory, every one in the
outbox's prediction log, written behind so Predict never waits on the disk), with the label
definition of the ensemble and of each voter at that moment (horizon, fee, label threshold, from
GetModelInfo). When an outcome arrives it is validated, recorded with one delivery per eligible
voter in the :class:`~xylen_coordinator.outbox.Outbox` in one fsynced transaction, scored into
the adaptive weights, and the :class:`~xylen_coordinator.outbox.Forwarder` delivers it once it is
due.

**How long it is kept.** :meth:`Ledger.sweep` (at start, every :data:`_SWEEP_SECONDS`, or
:meth:`~xylen_coordinator.coordinator.AsyncCoordinator.sweep_outbox`) deletes predictions and
finished outcomes older than ``feedback_queue.retention_seconds`` from the outbox, a small
transaction at a time, and forgets the remembered predictions that old; a Feedback for one of
them is PREDICTION_NOT_FOUND, as for an id never seen. An outcome with a delivery pending is
kept however old, as long as the delivery's server is configured (an enabled endpoint): a
delivery to a server that has been absent from the configuration for longer than the retention
is *abandoned* first (a final state, counted by server, told once per server), and then swept
like a delivered one. The adaptive weights rebuilt at start score the outcomes still kept. A
reload (:meth:`Ledger.reconfigure`) changes the retention for the next sweep and the
forwarder's backoff and call timeout for its next delivery.

**Which voters get an outcome.** A trade follows the ensemble's decision, so its outcome is the
underlying's move over the *ensemble's* horizon (the horizon of the label definition the
ensemble combined, :func:`~xylen_coordinator.ensemble.label_plan`). A server labels a Feedback
as the move over *its own* horizon, so the outcome is forwarded only to voters whose horizon
equals the ensemble's. Any other voter is skipped: ``HORIZON_MISMATCH`` (e.g. a 4-bar model
under a 1-bar ensemble) or ``HORIZON_UNKNOWN`` (its model info was not known when it voted while
the ensemble's was). A skip is counted per server and reason
(:meth:`~xylen_coordinator.metrics.Metrics.not_forwarded`, exported as
``xylen_coordinator_feedback_not_forwarded_total``), logged, and listed in
:attr:`~xylen_coordinator.results.FeedbackAck.not_forwarded`. The coordinator does not compute
the move over the skipped model's own horizon instead: a Feedback carries one move (one close
time, one return) and the coordinator keeps no candle history, so that move is not known here;
a caller who has it sends Feedback to that model server directly. When no label definition is
known at all (servers without GetModelInfo, an outbox from before labels were kept) the outcome
goes to every voter, as before.

**What a vote is scored against.** The adaptive weights score each vote against the label the
model was trained for, by the same rule the server applies to that Feedback
(``outcome_label``): the underlying's move as :func:`xylen_server.outcomes.underlying_move` reads
it, labelled by ``training.labels.label_from_return`` net of the model's own round-trip fee,
against its own label threshold, never "did the price
rise" before fees. A model that said "up" on a move too small to pay the fee was wrong by the
definition it predicts. The score is the exponentially decayed Brier score of the probability
against that label (a proper scoring rule; ``weights.adaptive.metric: brier``, the default) or
the hit rate of ``p >= 0.5`` (``hit_rate``; weak for calibrated models, whose P(up net of fees)
rarely crosses 0.5). Only voters the outcome was eligible for are scored (same horizon); with no
label definition known the move is scored before fees (fee 0, threshold 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from training.labels import label_from_return
from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator.config import FeedbackQueueSettings, Retraining
from xylen_coordinator.ensemble import AdaptiveWeights, Label
from xylen_coordinator.metrics import Metrics
from xylen_coordinator.outbox import (
    SWEEP_BATCH,
    SWEEP_START,
    Forwarder,
    Outbox,
    PredictionRecord,
    with_decision_side,
)
from xylen_coordinator.replicas import ReplicaSet
from xylen_coordinator.results import FeedbackAck, RowDecision
from xylen_server import clock
from xylen_server.errors import FailedPrecondition, InvalidArgument, NotFound, XylenError
from xylen_server.outcomes import (
    check_finite,
    check_prediction_id,
    check_side,
    close_time_ms,
    underlying_move,
)
from xylen_server.settings import Settings
from xylen_server.trouble import Trouble, describe, storage_error

logger = logging.getLogger(__name__)

#: Ensemble predictions remembered in memory for Feedback (older ones are read from disk).
_PREDICTION_MEMORY = 100_000
#: Largest clock skew tolerated on an outcome's close_time: the model servers' default
#: (FEEDBACK_MAX_CLOCK_SKEW_SECONDS), so that no outcome acknowledged here is refused there.
_FUTURE_SKEW_S = Settings.feedback_max_clock_skew_seconds
#: Longest prediction id accepted (UTF-8 bytes; the coordinator's own are about 25): the model
#: servers' default (FEEDBACK_MAX_ID_BYTES).
MAX_PREDICTION_ID_BYTES = Settings.feedback_max_id_bytes
#: Characters of a prediction id quoted in an error message.
_SHOWN_ID_CHARS = 40
#: Seconds between two writes of the prediction log (and retries of a failed one).
_FLUSH_SECONDS = 0.2
#: Seconds between two retention sweeps of the outbox (the first runs at start) ...
_SWEEP_SECONDS = 300.0
#: ... and before the next try after a sweep failed (a full disk).
_SWEEP_RETRY_SECONDS = 60.0
#: The outbox's tables, as the retention sweep counts them.
PRUNED_TABLES = ("predictions", "outcomes", "deliveries")


class Ledger:
    """Ensemble predictions and their outcomes: remembered, recorded, scored and forwarded."""

    def __init__(self, adaptive: AdaptiveWeights, metrics: Metrics | None = None) -> None:
        self.adaptive = adaptive
        """The weights each matured outcome scores."""
        self.metrics = metrics if metrics is not None else Metrics()
        """Where outcomes not forwarded to a voter are counted (by server and reason)."""
        self._outbox: Outbox | None = None
        self._forwarder: Forwarder | None = None
        self._records: OrderedDict[str, PredictionRecord] = OrderedDict()
        self._unwritten: list[tuple[str, float, PredictionRecord]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._trouble = Trouble("prediction_log", "the outbox", logger, self.metrics.outbox_failed)
        """The prediction log's failed writes: counted, logged when they begin and end."""
        self._sweep_trouble = Trouble(
            "retention_sweep", "the outbox", logger, self.metrics.outbox_failed
        )
        """Failed retention sweeps, the same way."""
        self.settings = FeedbackQueueSettings()
        """The ``feedback_queue`` settings in force (from open, then each reload)."""
        self._clients: Callable[[], Mapping[str, ReplicaSet]] = dict
        self._abandoning: set[str] = set()
        """Servers whose deliveries were abandoned and that are still absent: told once."""

    @property
    def retention_seconds(self) -> float:
        """How long predictions and finished outcomes are kept."""
        return self.settings.retention_seconds

    def delivery_retries(self) -> int:
        """Deliveries that failed and were rescheduled since the outbox opened."""
        return 0 if self._forwarder is None else self._forwarder.retries

    async def open(
        self,
        settings: FeedbackQueueSettings,
        clients: Callable[[], Mapping[str, ReplicaSet]],
    ) -> None:
        """Open the outbox, score every outcome it holds (rebuilding the adaptive weights), and
        start forwarding to ``clients()`` and writing the prediction log."""
        self.settings = settings
        self._clients = clients
        self._outbox = outbox = Outbox(settings.path)
        for stored in await outbox.run(outbox.outcomes):
            self._score(stored.record, stored.outcome)
        self._forwarder = Forwarder(outbox, settings, clients, self.metrics)
        self._forwarder.start()
        self._flusher = asyncio.create_task(self._flush_loop(), name="prediction-log")
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="outbox-retention")

    def reconfigure(self, settings: FeedbackQueueSettings) -> None:
        """Apply a reloaded ``feedback_queue``: the retention from the next sweep, the
        backoff and the call timeout from the forwarder's next delivery (a retry already
        scheduled keeps its time); each change logged. ``path`` is not changed here: the outbox
        stays where it was opened until a restart (the coordinator's reload says so)."""
        old = self.settings
        for name in (
            "retention_seconds",
            "retry_initial_seconds",
            "retry_max_seconds",
            "call_timeout_seconds",
        ):
            before, after = getattr(old, name), getattr(settings, name)
            if before != after:
                logger.info("feedback_queue.%s: %g -> %g, in force now", name, before, after)
        self.settings = dataclasses.replace(settings, path=old.path)
        if self._forwarder is not None:
            self._forwarder.settings = self.settings

    async def close(self) -> None:
        """Stop forwarding, write the rest of the prediction log, close the outbox."""
        if self._forwarder is not None:
            await self._forwarder.close()
        for task in (self._flusher, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            await self._flush()
        except Exception as exc:
            self.metrics.outbox_failed("prediction_log")
            logger.error(
                "prediction log: %d ensemble predictions could not be written at close (%s); "
                "an outcome for one of them after a restart is PREDICTION_NOT_FOUND",
                len(self._unwritten),
                describe(exc),
                exc_info=not storage_error(exc),
            )
        finally:
            if self._outbox is not None:
                await self._outbox.close()

    # -- predictions ------------------------------------------------------------------------

    def remember(
        self,
        row: RowDecision,
        now: float,
        features: tuple[float, ...] = (),
        feature_servers: Sequence[str] = (),
        *,
        label: Label | None = None,
        labels: Mapping[str, Label | None] | None = None,
    ) -> None:
        """Keep ``row`` (decided at ``now``, epoch seconds) for the outcome that may follow,
        with the ``features`` the voters in ``feature_servers`` predicted on, if known, the
        ensemble's ``label`` definition and each server's own (``labels``, None: unknown)."""
        voters = {v.server_name: (v.model_prediction_id, v.probability) for v in row.votes}
        record = PredictionRecord(
            row.signal.value,
            voters,
            now,
            features,
            tuple(name for name in feature_servers if name in voters) if features else (),
            label,
            {n: own for n, own in (labels or {}).items() if n in voters and own is not None},
        )
        self._records[row.prediction_id] = record
        if len(self._records) > _PREDICTION_MEMORY:
            self._records.popitem(last=False)
        self._unwritten.append((row.prediction_id, now, record))

    async def _flush(self) -> None:
        if self._unwritten and self._outbox is not None:
            batch, self._unwritten = self._unwritten, []
            try:
                await self._outbox.run(self._outbox.write_predictions, batch)
            except BaseException:
                self._keep_for_retry(batch)
                raise

    def _keep_for_retry(self, batch: list[tuple[str, float, PredictionRecord]]) -> None:
        """A batch that could not be written (a full disk) goes back ahead of the predictions
        remembered since, for the next write (it was lost from the outbox, and an outcome for
        one of them after a restart was PREDICTION_NOT_FOUND). While the disk stays full at
        most as many wait as are remembered in memory; older ones are dropped, logged."""
        waiting = batch + self._unwritten
        dropped = len(waiting) - _PREDICTION_MEMORY
        if dropped > 0:
            waiting = waiting[dropped:]
            logger.error(
                "%d ensemble predictions could not be written to the outbox and are dropped",
                dropped,
            )
        self._unwritten = waiting

    async def _flush_loop(self) -> None:
        """Write the prediction log every :data:`_FLUSH_SECONDS`. While the writes fail (a full
        disk) the predictions wait in memory (:meth:`_keep_for_retry`) and every attempt is
        counted, but only the change is logged (:class:`~xylen_server.trouble.Trouble`):
        one warning when the writes begin to fail, one line when they work again."""
        while True:
            await asyncio.sleep(_FLUSH_SECONDS)
            try:
                await self._flush()
            except Exception as exc:
                self._trouble.failed(
                    exc,
                    f"{len(self._unwritten)} ensemble predictions wait in memory (up to "
                    f"{_PREDICTION_MEMORY}), retried every {_FLUSH_SECONDS:.1f}s",
                )
            else:
                self._trouble.worked()

    # -- retention --------------------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> dict[str, int]:
        """Delete what is older than the retention from the outbox, a batch per transaction on
        its database thread (the write-behind of predictions waits for one batch at most):
        predictions made before ``now - retention`` without an outcome, outcomes received
        before it whose deliveries are all finished, with those deliveries and their
        predictions. A pending delivery is never deleted, however old, nor its outcome; first,
        though, the deliveries to servers absent from the configuration for longer than the
        retention are abandoned (:meth:`_abandon`), and so finished. The predictions remembered
        in memory that old are forgotten too, so a Feedback for any of them is
        PREDICTION_NOT_FOUND, as one for an unknown id. Returns the rows deleted by table, also
        counted in :meth:`~xylen_coordinator.metrics.Metrics.pruned`.

        ``now`` (epoch seconds) is when to sweep as of; by default each table's own clock: the
        learning clock for predictions (:mod:`xylen_server.clock`: a replay's simulated time,
        as their ``created``), the wall clock for outcomes (their ``received``) and for how long
        a server has been absent (a ``now`` ahead of the clock notes the configured servers as
        seen then)."""
        outbox = self._outbox
        removed = dict.fromkeys(PRUNED_TABLES, 0)
        if outbox is None:
            return removed
        made = (clock.now_seconds() if now is None else now) - self.retention_seconds
        wall = time.time() if now is None else now
        received = wall - self.retention_seconds
        self._forget(made)
        await self._abandon(outbox, wall)
        after: tuple[float, int] | None = SWEEP_START
        while after is not None:
            rows, after = await outbox.run(outbox.prune_predictions, made, after)
            removed["predictions"] += rows
            self.metrics.pruned("predictions", rows)
        after = SWEEP_START
        while after is not None:
            counts, after = await outbox.run(outbox.prune_outcomes, received, after)
            for table, rows in counts.items():
                removed[table] += rows
                self.metrics.pruned(table, rows)
        return removed

    async def _abandon(self, outbox: Outbox, now: float) -> None:
        """Mark ``abandoned`` the pending deliveries to every server that has not been an
        enabled endpoint for longer than the retention as of ``now`` (epoch seconds), a batch
        per transaction; counted by server, and told once per server until it is configured
        again. A configured server's deliveries are never abandoned, however long it is down."""
        configured = set(self._clients())
        self._abandoning -= configured  # configured again: told again if it leaves again
        absent = await outbox.run(outbox.absent_targets, configured, now)
        for name, seen in sorted(absent.items()):
            if seen > now - self.retention_seconds:
                continue  # it may come back with the next reload
            since = datetime.fromtimestamp(seen, UTC).isoformat(timespec="seconds")
            error = (
                f"abandoned: {name} not configured since {since}, longer than the retention "
                f"({retention_text(self.retention_seconds)})"
            )
            total, rows = 0, SWEEP_BATCH
            while rows == SWEEP_BATCH:
                rows = await outbox.run(outbox.abandon, name, error, SWEEP_BATCH)
                total += rows
                self.metrics.abandoned(name, rows)
            if total and name not in self._abandoning:
                self._abandoning.add(name)
                logger.warning(
                    "feedback: %d outcomes waiting for %s abandoned: it has not been an enabled "
                    "endpoint since %s, longer than feedback_queue.retention_seconds (%s); they "
                    "are not retried and go with the retention sweep; later ones for it are "
                    "abandoned too, counted, without another line until it is configured again",
                    total,
                    name,
                    since,
                    retention_text(self.retention_seconds),
                )

    def _forget(self, made_before: float) -> None:
        """Drop the remembered predictions made before ``made_before`` (oldest first)."""
        records = self._records
        while records:
            oldest = next(iter(records.values()))
            if oldest.created >= made_before:
                return
            records.popitem(last=False)

    async def _sweep_loop(self) -> None:
        """:meth:`sweep` at start and every :data:`_SWEEP_SECONDS`; a failed sweep (a full disk)
        is counted, told once (:class:`~xylen_server.trouble.Trouble`) and tried again after
        :data:`_SWEEP_RETRY_SECONDS`."""
        first = True
        while True:
            started = time.monotonic()
            try:
                removed = await self.sweep()
            except Exception as exc:
                self._sweep_trouble.failed(
                    exc,
                    f"rows older than the retention stay until the next sweep, in "
                    f"{_SWEEP_RETRY_SECONDS:g}s",
                )
                wait = _SWEEP_RETRY_SECONDS
            else:
                self._sweep_trouble.worked()
                total = sum(removed.values())
                logger.log(
                    logging.INFO if first and total else logging.DEBUG,
                    "outbox retention sweep: %d predictions, %d outcomes and %d deliveries "
                    "older than %s removed in %.1fs",
                    removed["predictions"],
                    removed["outcomes"],
                    removed["deliveries"],
                    retention_text(self.retention_seconds),
                    time.monotonic() - started,
                )
                first = False
                wait = _SWEEP_SECONDS
            await asyncio.sleep(wait)

    # -- outcomes ---------------------------------------------------------------------------

    async def accept(
        self,
        prediction_id: str,
        outcome: pb.TradeOutcome | None,
        retraining: Retraining,
        *,
        pnl: float = 0.0,
        realized_return: float | None = None,
        close_time: datetime | None = None,
        side: int = 0,
        underlying_log_return: float | None = None,
    ) -> FeedbackAck:
        """Record a trade's outcome for ``prediction_id`` durably and queue it for the servers
        that voted, as ``retraining`` says; ``outcome`` None builds it from the other arguments
        (``close_time`` defaults to now). A second outcome for the same prediction is
        acknowledged as a duplicate and queues nothing.

        An outcome with neither ``side`` nor ``underlying_log_return`` is taken as a trade that
        followed the ensemble's decision (BUY: long, SELL: short) and forwarded with that side,
        so every server labels it by the underlying's move; after a HOLD there is no such
        trade and it is refused (INVALID_ARGUMENT, MISSING_UNDERLYING_MOVE)."""
        outbox = self._outbox
        if outbox is None:
            raise FailedPrecondition("the coordinator is not started", reason="NOT_STARTED")
        if not retraining.enabled:
            raise FailedPrecondition(
                "feedback is switched off (retraining.enabled: false)", reason="FEEDBACK_DISABLED"
            )
        if outcome is None:
            if realized_return is None:
                raise InvalidArgument("realized_return is required", reason="INVALID_OUTCOME")
            outcome = pb.TradeOutcome(pnl=pnl, realized_return=realized_return, side=side)  # type: ignore[arg-type]
            if underlying_log_return is not None:
                outcome.underlying_log_return = underlying_log_return
            outcome.close_time.FromDatetime(
                close_time or datetime.fromtimestamp(clock.now_seconds(), UTC)
            )
        close = _validate_outcome(prediction_id, outcome)
        record = self._records.get(prediction_id)
        if record is None:
            record = await outbox.run(outbox.find_prediction, prediction_id)
        if record is None:
            shown = prediction_id[:_SHOWN_ID_CHARS]
            raise NotFound(
                f"no ensemble prediction {shown!r} is known to this coordinator (predictions "
                f"are kept for {retention_text(self.retention_seconds)}: "
                "feedback_queue.retention_seconds)",
                reason="PREDICTION_NOT_FOUND",
                prediction_id=shown,
            )
        if record.created and close < record.created - _FUTURE_SKEW_S:
            raise InvalidArgument(
                "outcome.close_time is before the prediction was made",
                reason="INVALID_OUTCOME",
                field="close_time",
            )
        outcome = _with_side(outcome, record)
        received = time.time()
        due = received + retraining.feedback_delay_seconds
        eligible, skipped = _eligible(record)
        targets = eligible if retraining.send_feedback_to_models else ()
        fresh = await outbox.run(
            outbox.enqueue,
            prediction_id,
            outcome.SerializeToString(),
            record,
            targets,
            received,
            due,
        )
        if fresh:
            if retraining.send_feedback_to_models:
                for name, reason in skipped.items():
                    self.metrics.not_forwarded(name, reason)
                    logger.info(
                        "feedback %s not forwarded to %s (%s): %s",
                        prediction_id,
                        name,
                        reason,
                        _skip_text(reason, record, name),
                    )
            self._score(record, outcome)
            if self._forwarder is not None:
                self._forwarder.wake()
        return FeedbackAck(
            prediction_id=prediction_id,
            duplicate=not fresh,
            forward_to=targets,
            forward_time=datetime.fromtimestamp(due, UTC),
            not_forwarded=dict(skipped) if retraining.send_feedback_to_models else {},
        )

    def _score(self, record: PredictionRecord, outcome: pb.TradeOutcome) -> None:
        """Score each eligible voter's probability against the label its model was trained
        for: the server's own rule (``underlying_move`` then ``label_from_return``) with the
        voter's fee and label threshold
        (fee 0 and threshold 0 when no label definition is known at all)."""
        outcome = with_decision_side(outcome, record.signal) or outcome
        try:
            move = underlying_move(
                realized_return=outcome.realized_return,
                side=outcome.side,
                underlying_log_return=(
                    outcome.underlying_log_return
                    if outcome.HasField("underlying_log_return")
                    else None
                ),
            )
        except XylenError:  # the outcome cannot say how the price moved: nothing to score
            return
        eligible, _ = _eligible(record)
        for name in eligible:
            fee, threshold = record.labels[name][1:] if name in record.labels else (0.0, 0.0)
            try:
                label = float(label_from_return(move, fee=fee, threshold=threshold))
            except ValueError:  # a fee the server reported outside [0, 1): not scorable
                logger.warning("%s reported fee %r: its vote is not scored", name, fee)
                continue
            self.adaptive.record(name, record.votes[name][1], bool(label))

    async def pending(self) -> int:
        """Outcomes not yet delivered to every target."""
        if self._outbox is None:
            return 0
        return await self._outbox.run(self._outbox.pending_count)

    async def delivery_states(self, prediction_id: str) -> dict[str, tuple[str, int, str]]:
        """Server name -> (state, attempts, last error) of one outcome's deliveries."""
        if self._outbox is None:
            return {}
        return await self._outbox.run(self._outbox.delivery_states, prediction_id)


def retention_text(seconds: float) -> str:
    """``7 days``, ``36 hours``, ``90 minutes``: a retention as people say it."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} seconds"


def _with_side(outcome: pb.TradeOutcome, record: PredictionRecord) -> pb.TradeOutcome:
    """``outcome`` with the side of the trade that followed the ensemble's decision, when it
    carries neither a side nor the underlying's return; INVALID_ARGUMENT after a HOLD."""
    sided = with_decision_side(outcome, record.signal)
    if sided is None:
        raise InvalidArgument(
            "outcome.underlying_log_return (or outcome.side) is required: the ensemble said "
            "HOLD, so the trade's return does not say whether the price rose",
            reason="MISSING_UNDERLYING_MOVE",
            field="underlying_log_return",
        )
    return sided


#: Why an outcome was not forwarded to a voter (the metric's ``reason``).
HORIZON_MISMATCH = "HORIZON_MISMATCH"
HORIZON_UNKNOWN = "HORIZON_UNKNOWN"


def _eligible(record: PredictionRecord) -> tuple[tuple[str, ...], dict[str, str]]:
    """The voters whose label horizon is the outcome's (the ensemble's), in vote order, and
    the others with the reason; every voter when the ensemble's label is not known."""
    if record.label is None:
        return tuple(record.votes), {}
    horizon = record.label[0]
    eligible: list[str] = []
    skipped: dict[str, str] = {}
    for name in record.votes:
        own = record.labels.get(name)
        if own is None:
            skipped[name] = HORIZON_UNKNOWN
        elif own[0] != horizon:
            skipped[name] = HORIZON_MISMATCH
        else:
            eligible.append(name)
    return tuple(eligible), skipped


def _skip_text(reason: str, record: PredictionRecord, name: str) -> str:
    assert record.label is not None
    bars = record.label[0]
    if reason == HORIZON_MISMATCH:
        return (
            f"its label horizon is {record.labels[name][0]} bars, the outcome's (the "
            f"ensemble's) {bars}: it would be stored with the wrong label"
        )
    return f"its label horizon was not known when it voted; the outcome's is {bars} bars"


def _validate_outcome(prediction_id: str, outcome: pb.TradeOutcome) -> float:
    """Refuse what a model server's Feedback would refuse (the same checks,
    :mod:`xylen_server.outcomes`); returns close_time in epoch seconds."""
    check_prediction_id(prediction_id, MAX_PREDICTION_ID_BYTES)
    check_side(outcome.side)
    for name in ("pnl", "realized_return", "underlying_log_return"):
        check_finite(name, getattr(outcome, name))
    close_time = (
        (outcome.close_time.seconds, outcome.close_time.nanos)
        if outcome.HasField("close_time")
        else None
    )
    latest_ms = clock.now_ms() + int(_FUTURE_SKEW_S * 1000)
    return close_time_ms(close_time, latest_ms) / 1000
