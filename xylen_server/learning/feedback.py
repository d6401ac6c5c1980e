"""Feedback: outcomes validated and joined to what the server predicted, stored durably.

:func:`build_record` validates one Feedback call against every limit the store and training
need (id length, feature count and float32 range, finite outcome, a close time in range) and
joins it to the logged prediction (the exact features the model saw), so whatever is
acknowledged can be read back. :class:`FeedbackLoop` owns the
:class:`~xylen_server.learning.prediction_log.PredictionLog` (every answered Predict batch,
recorded on the hot path without I/O) and the durable
:class:`~xylen_server.learning.feedback_store.FeedbackStore` (Feedback is acknowledged only once
its record is committed and fsynced). It also keeps the live figures the automatic retrain
triggers read: how many new samples arrived since the serving model's data was cut off, and the
rolling accuracy over the last ``RETRAIN_ACCURACY_WINDOW`` outcomes of predictions this server
made.

Everything lives in ``<FEEDBACK_DATA_DIR>/<MODEL_NAME>/``. A store that cannot be opened (locked
by another process: two servers of one model name on one data directory; a full disk) does not
stop the server: Predict serves, Feedback answers UNAVAILABLE (reason
FEEDBACK_STORE_UNAVAILABLE) so callers retry, and the next Feedback tries to open it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Container, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from training.labels import label_from_return
from training.metadata import model_input
from xylen_server import clock
from xylen_server.auth import ANONYMOUS
from xylen_server.errors import InvalidArgument, NotFound, SettingsError, Unavailable
from xylen_server.learning.feedback_store import AppendResult, FeedbackStore
from xylen_server.learning.prediction_log import LoggedPrediction, PredictionLog
from xylen_server.learning.samples import FeedbackRecord
from xylen_server.outcomes import (
    check_finite,
    check_prediction_id,
    close_time_ms,
    underlying_move,
)
from xylen_server.settings import Settings
from xylen_server.trouble import FailureCounts

if TYPE_CHECKING:
    from training.metadata import ModelMetadata
    from xylen_server.serving.model_store import LoadedModel
    from xylen_server.serving.predictor import Result

logger = logging.getLogger(__name__)

CUTOFF_KEY = "received_until_ms"
"""``metadata.data["feedback"][CUTOFF_KEY]``: the newest feedback a retrained model has seen."""


def feedback_cutoff_ms(meta: ModelMetadata) -> int:
    """Feedback received after this instant (UTC ms) is new to the model (0: all of it)."""
    feedback = meta.data.get("feedback") if isinstance(meta.data, dict) else None
    if isinstance(feedback, dict):
        return int(feedback.get(CUTOFF_KEY, 0) or 0)
    return 0


class FeedbackLoop:
    """Prediction log, feedback store and the live record of outcomes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        try:
            clock.use_file(settings.clock_file)
        except clock.ClockError as exc:
            raise SettingsError(str(exc)) from None
        self.storage_failures = FailureCounts()
        """Failed attempts of the background writers by part (``prediction_log``,
        ``feedback_commit``, ``feedback_compaction``): ``xylen_storage_failures_total``."""
        self.log = PredictionLog(
            settings.prediction_log_path,
            max_rows=settings.prediction_log_max_rows,
            max_age_seconds=settings.prediction_log_max_age_seconds,
            flush_rows=settings.prediction_log_flush_rows,
            flush_interval_seconds=settings.prediction_log_flush_interval_seconds,
            max_bytes=settings.prediction_log_max_bytes,
            rollup_seconds=settings.prediction_log_rollup_seconds,
            count_failure=self.storage_failures.count,
        )
        self._store: FeedbackStore | None = None
        self._store_error = ""
        self._closed = False
        self._store_lock = threading.Lock()
        self.outcomes: deque[bool] = deque(maxlen=settings.retrain_accuracy_window)
        """Was the served prediction right? One entry per new outcome of a logged prediction."""
        self.new_samples = 0
        """Samples received after the serving model's feedback cut-off."""
        self.arrived = 0
        """Samples received since the last retrain job ended or the model changed (what the
        sample-count trigger reads, so a refused retrain waits for new evidence)."""
        self.acknowledged = 0
        """Feedback records acknowledged (committed; duplicates included) since the start."""
        self.on_stored: list[Callable[[], None]] = []
        """Called after every newly stored sample (the automatic retrain triggers)."""
        self.owns_store = True
        """False in a worker that is not the owner of the learning loop (WORKERS > 1): it never
        opens the store (its Feedback calls go to the owner)."""
        self.find_elsewhere: Callable[[str], Awaitable[LoggedPrediction | None]] | None = None
        """The owner of several workers: asks the other workers' prediction logs for an id
        this process did not answer (before the on-disk log)."""

    # -- Predict --------------------------------------------------------------------------------

    def record(self, result: Result) -> None:
        """Remember one answered Predict batch (hot path: no I/O)."""
        meta = result.model.meta
        self.log.record(
            result.prediction_ids,
            result.rows,
            result.probabilities,
            result.signals,
            meta.name,
            meta.version,
        )

    # -- Feedback -------------------------------------------------------------------------------

    @property
    def store(self) -> FeedbackStore | None:
        """The feedback store, opened (and recovered) on first use; None if it cannot be
        opened now (the next use tries again: another process may let go, a disk may be
        freed)."""
        store = self._store
        if store is not None or self._closed or not self.owns_store:
            return store
        with self._store_lock:
            if self._store is None and not self._closed:
                try:
                    self._store = FeedbackStore(
                        self.settings.learning_dir,
                        group_commit=self.settings.feedback_group_commit,
                        compact_rows=self.settings.feedback_compact_rows,
                        slow_commit_ms=self.settings.feedback_slow_commit_ms,
                        count_failure=self.storage_failures.count,
                    )
                    self._store_error = ""
                except (RuntimeError, OSError, sqlite3.Error) as exc:
                    if str(exc) != self._store_error:  # once per cause, not once per call
                        logger.error("feedback store unavailable (Feedback: UNAVAILABLE): %s", exc)
                    self._store_error = str(exc)
            return self._store

    def require_store(self) -> FeedbackStore:
        """The feedback store, or UNAVAILABLE naming why it could not be opened."""
        store = self.store
        if store is None:
            raise Unavailable(
                f"feedback is not stored on this server: {self._store_error or 'closed'}",
                reason="FEEDBACK_STORE_UNAVAILABLE",
            )
        return store

    async def feedback(
        self,
        model: LoadedModel,
        prediction_id: str,
        pnl: float,
        realized_return: float,
        close_time: tuple[int, int] | None,
        features: Sequence[float] | None,
        side: int = 0,
        underlying_log_return: float | None = None,
        source: str = ANONYMOUS,
    ) -> AppendResult:
        """Validate, join to the logged prediction and store durably; idempotent by id.
        ``close_time`` is ``(seconds, nanos)`` since the epoch (see :func:`build_record`);
        ``source`` is the caller (:func:`xylen_server.auth.caller`), stored with the sample.

        The prediction is looked up in memory first, then (an id no longer held there: the
        server restarted, or memory was full) in the on-disk prediction log, as long as it is
        within ``PREDICTION_LOG_MAX_AGE_SECONDS``; the disk read runs off the event loop. Bad
        input is INVALID_ARGUMENT even while the store is down."""
        store = self.store
        logged = self.log.get(prediction_id)
        if logged is None and self.find_elsewhere is not None:
            logged = await self.find_elsewhere(prediction_id)
        if logged is None and store is not None and prediction_id not in store:
            logged = await asyncio.to_thread(self.log.find_recent, prediction_id)
        meta = model.meta
        record = build_record(
            prediction_id=prediction_id,
            pnl=pnl,
            realized_return=realized_return,
            close_time=close_time,
            features=features,
            prediction_log=None,
            logged=logged,
            model_name=meta.name,
            feature_count=len(meta.feature_names),
            side=side,
            underlying_log_return=underlying_log_return,
            fee=meta.fee,
            label_threshold=meta.label_threshold,
            already_stored=store if store is not None else _StoreDown(self),
            max_id_bytes=self.settings.feedback_max_id_bytes,
            max_clock_skew_seconds=self.settings.feedback_max_clock_skew_seconds,
        )
        if store is None:
            store = self.require_store()
        if source != record.source:
            record = dataclasses.replace(record, source=source[:_MAX_SOURCE_CHARS])
        result = await store.append_async(record)
        self.acknowledged += 1
        if not result.duplicate:
            self.new_samples += 1
            self.arrived += 1
            # The live record is the serving model's: an outcome of a call the replaced model
            # made (outcomes arrive a horizon later) would fill the new model's window with
            # the old one's calls and fire the accuracy trigger on them.
            if record.probability_up is not None and record.model_version == meta.version:
                self.outcomes.append((record.probability_up >= 0.5) == bool(record.label))
            for callback in self.on_stored:
                callback()
        return result

    # -- what the triggers read ---------------------------------------------------------------

    def live_accuracy(self) -> float | None:
        """Share of right calls over the last window of outcomes; None until the window fills."""
        if len(self.outcomes) < (self.outcomes.maxlen or 0):
            return None
        return sum(self.outcomes) / len(self.outcomes)

    def count_new(self, cutoff_ms: int) -> int:
        """Stored samples received after ``cutoff_ms`` (blocking)."""
        store = self.store
        if store is None:
            return 0
        if cutoff_ms <= 0:
            return store.count()
        frame = store.read_samples()
        received = frame.get_column("received_time").dt.epoch("ms")
        return int((received > cutoff_ms).sum())

    def stored_count(self) -> int | None:
        """Samples stored so far, or None while the store is not open (never opens it)."""
        store = self._store
        return None if store is None else store.count()

    def reset(self, new_samples: int) -> None:
        """After a model change: count against the new model, start the live record again."""
        self.new_samples = self.arrived = new_samples
        self.outcomes.clear()

    def job_ended(self) -> None:
        """After a retrain job, whatever its verdict: the triggers wait for new evidence."""
        self.arrived = 0
        self.outcomes.clear()

    def close(self) -> None:
        """Flush the prediction log and close the store (compacting its log). A log that
        cannot be written out (a full disk) is logged and the store still closed: its
        acknowledged records are durable already, and the shutdown goes on."""
        try:
            self.log.close()
        except Exception:
            logger.exception("the prediction log could not be flushed at close")
        finally:
            with self._store_lock:
                if self._store is not None:
                    self._store.close()
                self._closed = True


class _StoreDown:
    """``already_stored`` while the store cannot be opened: whether an id is stored is
    unknown, so asking answers UNAVAILABLE (not NOT_FOUND)."""

    def __init__(self, loop: FeedbackLoop) -> None:
        self._loop = loop

    def __contains__(self, prediction_id: object) -> bool:
        self._loop.require_store()
        return False


def _ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


_MAX_SOURCE_CHARS = 200
"""A source is an identity from a certificate or a fixed label; kept short whatever it is."""
_F32_MAX = float(np.finfo(np.float32).max)
_SHOWN_ID_CHARS = 64


def shown(prediction_id: str) -> str:
    """``prediction_id`` as an error message may show it: never longer than 64 characters."""
    if len(prediction_id) <= _SHOWN_ID_CHARS:
        return repr(prediction_id)
    return f"{prediction_id[:_SHOWN_ID_CHARS]!r}..."


def build_record(
    *,
    prediction_id: str,
    pnl: float,
    realized_return: float,
    close_time: tuple[int, int] | None,
    features: Sequence[float] | None,
    prediction_log: PredictionLog | None,
    model_name: str,
    feature_count: int | None = None,
    logged: LoggedPrediction | None = None,
    side: int = 0,
    underlying_log_return: float | None = None,
    fee: float = 0.0,
    label_threshold: float = 0.0,
    already_stored: Container[str] = (),
    max_id_bytes: int = Settings.feedback_max_id_bytes,
    max_clock_skew_seconds: float = Settings.feedback_max_clock_skew_seconds,
    now: datetime | None = None,
) -> FeedbackRecord:
    """Validate one Feedback call (plain values, not protobufs) and join it to the logged
    prediction. Raises :class:`InvalidArgument` or :class:`NotFound` with a stable reason.

    Every value is checked against the limits the store and the training data need before
    anything is stored, so an acknowledged record can always be read back and trained on.

    Args:
        prediction_id: ``FeedbackRequest.prediction_id``; at most ``max_id_bytes`` in UTF-8.
        pnl, realized_return: the outcome; both finite.
        close_time: when the trade closed, ``(seconds, nanos)`` since the Unix epoch as
            ``google.protobuf.Timestamp`` carries them; None when unset. From
            :data:`~xylen_server.outcomes.EARLIEST_CLOSE_TIME_S` to now plus the allowed clock
            skew.
        features: the request's feature row, or None when it carried none; finite and within
            float32 range, as Predict requires.
        prediction_log: where predictions are remembered in memory (None: none, or the
            caller looked the prediction up itself and passes ``logged``).
        model_name: the served model, recorded when the prediction is no longer logged.
        feature_count: features the served model takes, to check a request's row against.
        logged: the prediction, when the caller found it (e.g. in the on-disk log).
        side, underlying_log_return, fee, label_threshold: what :func:`outcome_label` needs
            (the outcome's side and underlying move; the model's fee and label threshold).
        already_stored: ids already stored (the :class:`FeedbackStore`); such an id passes
            without a logged row, so a repeated Feedback answers duplicate, not NOT_FOUND.
        max_id_bytes: the longest prediction id accepted (``FEEDBACK_MAX_ID_BYTES``).
        max_clock_skew_seconds: how far in the future ``close_time`` may be.
        now: the current time (tests).
    """
    check_prediction_id(prediction_id, max_id_bytes)
    check_finite("pnl", pnl)
    check_finite("realized_return", realized_return)
    now_ms = clock.now_ms() if now is None else _ms(now)
    skew_ms = int(max_clock_skew_seconds * 1000)
    close_ms = close_time_ms(close_time, now_ms + skew_ms)

    def label() -> int:
        """Last, so a request's other faults are named first."""
        return outcome_label(
            realized_return=realized_return,
            side=side,
            underlying_log_return=underlying_log_return,
            fee=fee,
            threshold=label_threshold,
        )

    row = None if features is None else _feature_row(features)
    if logged is None and prediction_log is not None:
        logged = prediction_log.get(prediction_id)
    if logged is not None:
        # Compared as the model takes them (model_input: float32, tiny values snapped to 0):
        # the features a caller sent to Predict are the ones it predicted on, also when one
        # is tiny (1e-36), which the log holds as the 0.0 the model saw.
        if row is not None and not np.array_equal(model_input(row), model_input(logged.features)):
            raise InvalidArgument(
                f"the features sent for {shown(prediction_id)} differ from those it was "
                "predicted on",
                reason="FEATURES_MISMATCH",
            )
        if close_ms < logged.time_ms - skew_ms:
            raise InvalidArgument(
                "outcome.close_time is before the prediction was made",
                reason="INVALID_OUTCOME",
                field="close_time",
            )
        return FeedbackRecord(
            prediction_id,
            logged.model_name,
            logged.model_version,
            logged.features,
            logged.probability_up,
            logged.signal,
            float(pnl),
            float(realized_return),
            close_ms,
            now_ms,
            label(),
            side=side,
            underlying_log_return=underlying_log_return,
        )
    if row is None:
        if prediction_id in already_stored:
            row = np.empty(0)
        else:
            raise NotFound(
                f"prediction {shown(prediction_id)} is unknown here (or too old); send its "
                "features",
                reason="UNKNOWN_PREDICTION_ID",
                prediction_id=prediction_id[:_SHOWN_ID_CHARS],
            )
    elif feature_count is not None and len(row) != feature_count:
        raise InvalidArgument(
            f"expected {feature_count} features, got {len(row)}", reason="FEATURE_COUNT_MISMATCH"
        )
    return FeedbackRecord(
        prediction_id,
        model_name,
        None,
        row.astype(np.float32),
        None,
        None,
        float(pnl),
        float(realized_return),
        close_ms,
        now_ms,
        label(),
        side=side,
        underlying_log_return=underlying_log_return,
    )


def outcome_label(
    *,
    realized_return: float,
    side: int,
    underlying_log_return: float | None,
    fee: float,
    threshold: float,
) -> int:
    """The training label of the bar a trade was taken on, from its outcome: the one rule
    ``training.labels.label_from_return`` applied to the underlying's log return over the
    model's horizon, net of the model's round-trip ``fee``, against its ``threshold``.

    The underlying's move is ``underlying_log_return`` when the outcome carries it (exact: the
    same number training computes from the candles). An outcome without it (a client from
    before the field) gives it through its ``side``: a LONG's ``realized_return`` is the
    underlying's simple return, a SHORT's its negation, read as before fees and over the
    horizon, so a profitable short is a down move. With neither there is no way to know
    whether the price rose: INVALID_ARGUMENT ``MISSING_UNDERLYING_MOVE`` naming both fields,
    rather than a label of another meaning in the training data.
    """
    move = underlying_move(
        realized_return=realized_return, side=side, underlying_log_return=underlying_log_return
    )
    return int(label_from_return(move, fee=fee, threshold=threshold))


def _feature_row(features: Sequence[float]) -> np.ndarray:
    """The request's row as float64, or INVALID_ARGUMENT for a value Predict would refuse."""
    row = np.asarray(features, dtype=np.float64)
    # One pass catches NaN (never <=), infinities and values float32 cannot hold.
    if not (np.abs(row) <= _F32_MAX).all():
        finite = np.isfinite(row)
        if not finite.all():
            index = int(np.argmin(finite))
            raise InvalidArgument(
                f"feature {index} is {row[index]}; feature values must be finite",
                reason="NON_FINITE_FEATURE",
                feature=index,
            )
        index = int(np.argmax(np.abs(row) > _F32_MAX))
        raise InvalidArgument(
            f"feature {index} is {row[index]:g}, outside the float32 range the model runs in",
            reason="FEATURE_OUT_OF_RANGE",
            feature=index,
        )
    return row
