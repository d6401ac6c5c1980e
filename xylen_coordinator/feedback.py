"""The feedback path: from an ensemble prediction to its trade's outcome at every server that
voted on it.

:class:`Ledger` remembers each ensemble prediction (the latest in memory, every one in the
outbox's prediction log, written behind so Predict never waits on the disk). When an outcome
arrives it is validated, recorded with one delivery per voter in the
:class:`~xylen_coordinator.outbox.Outbox` in one fsynced transaction, scored into the adaptive
weights, and the :class:`~xylen_coordinator.outbox.Forwarder` delivers it once it is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator.config import FeedbackQueueSettings, Retraining
from xylen_coordinator.ensemble import AdaptiveWeights
from xylen_coordinator.outbox import Forwarder, Outbox, PredictionRecord, with_decision_side
from xylen_coordinator.replicas import ReplicaSet
from xylen_coordinator.results import FeedbackAck, RowDecision
from xylen_server import clock
from xylen_server.errors import FailedPrecondition, InvalidArgument, NotFound
from xylen_server.outcomes import check_finite, check_prediction_id, check_side, close_time_ms
from xylen_server.settings import Settings

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


class Ledger:
    """Ensemble predictions and their outcomes: remembered, recorded, scored and forwarded."""

    def __init__(self, adaptive: AdaptiveWeights) -> None:
        self.adaptive = adaptive
        """The weights each matured outcome scores."""
        self._outbox: Outbox | None = None
        self._forwarder: Forwarder | None = None
        self._records: OrderedDict[str, PredictionRecord] = OrderedDict()
        self._unwritten: list[tuple[str, float, PredictionRecord]] = []
        self._flusher: asyncio.Task[None] | None = None

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
        self._outbox = outbox = Outbox(settings.path)
        for stored in await outbox.run(outbox.outcomes):
            self._score(stored.record, stored.outcome)
        self._forwarder = Forwarder(outbox, settings, clients)
        self._forwarder.start()
        self._flusher = asyncio.create_task(self._flush_loop(), name="prediction-log")

    async def close(self) -> None:
        """Stop forwarding, write the rest of the prediction log, close the outbox."""
        if self._forwarder is not None:
            await self._forwarder.close()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._flush()
        if self._outbox is not None:
            await self._outbox.close()

    # -- predictions ------------------------------------------------------------------------

    def remember(
        self,
        row: RowDecision,
        now: float,
        features: tuple[float, ...] = (),
        feature_servers: tuple[str, ...] = (),
    ) -> None:
        """Keep ``row`` (decided at ``now``, epoch seconds) for the outcome that may follow,
        with the ``features`` the voters in ``feature_servers`` predicted on, if known."""
        voters = {v.server_name: (v.model_prediction_id, v.probability) for v in row.votes}
        record = PredictionRecord(
            row.signal.value,
            voters,
            now,
            features,
            tuple(name for name in feature_servers if name in voters) if features else (),
        )
        self._records[row.prediction_id] = record
        if len(self._records) > _PREDICTION_MEMORY:
            self._records.popitem(last=False)
        self._unwritten.append((row.prediction_id, now, record))

    async def _flush(self) -> None:
        if self._unwritten and self._outbox is not None:
            batch, self._unwritten = self._unwritten, []
            await self._outbox.run(self._outbox.write_predictions, batch)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            try:
                await self._flush()
            except Exception:
                logger.exception("writing the prediction log failed")

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
                f"no ensemble prediction {shown!r} is known to this coordinator",
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
        targets = tuple(record.votes) if retraining.send_feedback_to_models else ()
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
            self._score(record, outcome)
            if self._forwarder is not None:
                self._forwarder.wake()
        return FeedbackAck(
            prediction_id=prediction_id,
            duplicate=not fresh,
            forward_to=targets,
            forward_time=datetime.fromtimestamp(due, UTC),
        )

    def _score(self, record: PredictionRecord, outcome: pb.TradeOutcome) -> None:
        """Update each voter's live record with whether the underlying rose: its log return when
        the outcome carries it, else the side's reading of the trade's return (a short that
        made money means the price fell), as the servers label it (before fees: the
        coordinator does not know each model's fee)."""
        went_up = _went_up(with_decision_side(outcome, record.signal) or outcome)
        if went_up is None:
            return
        for name, (_, probability) in record.votes.items():
            self.adaptive.record(name, probability, went_up)

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


def _went_up(outcome: pb.TradeOutcome) -> bool | None:
    """Did the underlying rise over the horizon? None when the outcome cannot say (no move)."""
    if outcome.HasField("underlying_log_return"):
        move = outcome.underlying_log_return
    elif outcome.side == pb.TradeSide.TRADE_SIDE_LONG:
        move = outcome.realized_return
    elif outcome.side == pb.TradeSide.TRADE_SIDE_SHORT:
        move = -outcome.realized_return
    else:
        return None
    if move == 0:
        return None
    return move > 0


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
