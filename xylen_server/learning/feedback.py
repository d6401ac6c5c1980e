"""The server's side of continuous learning: what it predicted, what came back, how it is doing.

:class:`Learning` owns the
:class:`~xylen_server.learning.prediction_log.PredictionLog` (every Predict batch, recorded on
the hot path without I/O) and the durable
:class:`~xylen_server.learning.feedback_store.FeedbackStore` (Feedback is acknowledged only once its
record is fsynced). It also keeps the two live figures the automatic triggers read: how many new
samples arrived since the serving model's data was cut off, and the rolling accuracy over the
last ``RETRAIN_ACCURACY_WINDOW`` outcomes of predictions this server made.

Everything lives in ``<FEEDBACK_DATA_DIR>/<MODEL_NAME>/``. A store locked by another process (two
servers of one model name on one data directory) does not stop the server: Predict serves, and
Feedback answers UNAVAILABLE (reason FEEDBACK_STORE_UNAVAILABLE) so callers retry elsewhere.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from datetime import UTC
from typing import TYPE_CHECKING

import polars as pl

from xylen.v1 import model_service_pb2 as pb
from xylen_server.errors import Unavailable
from xylen_server.learning.feedback_store import FeedbackStore, build_record
from xylen_server.learning.prediction_log import PredictionLog
from xylen_server.settings import Settings

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


class Learning:
    """Prediction log, feedback store and the live record of outcomes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = PredictionLog(
            settings.prediction_log_path,
            max_rows=settings.prediction_log_max_rows,
            max_age_seconds=settings.prediction_log_max_age_seconds,
            flush_rows=settings.prediction_log_flush_rows,
            flush_interval_seconds=settings.prediction_log_flush_interval_seconds,
        )
        self._store: FeedbackStore | None = None
        self._store_error = ""
        self._store_lock = threading.Lock()
        self.outcomes: deque[bool] = deque(maxlen=settings.retrain_accuracy_window)
        """Was the served prediction right? One entry per new outcome of a logged prediction."""
        self.new_samples = 0
        """Samples received after the serving model's feedback cut-off."""
        self.arrived = 0
        """Samples received since the last retrain job ended or the model changed (what the
        sample-count trigger reads, so a refused retrain waits for new evidence)."""

    # -- Predict --------------------------------------------------------------------------------

    def record(self, result: Result, signals: Sequence[int]) -> None:
        """Remember one answered Predict batch (hot path: no I/O)."""
        meta = result.model.meta
        self.log.record(
            result.prediction_ids,
            result.rows,
            result.probabilities,
            signals,
            meta.name,
            meta.version,
        )

    # -- Feedback -------------------------------------------------------------------------------

    @property
    def store(self) -> FeedbackStore | None:
        """The feedback store, opened (and recovered) on first use; None if it cannot be."""
        store = self._store
        if store is not None or self._store_error:
            return store
        with self._store_lock:
            if self._store is None and not self._store_error:
                try:
                    self._store = FeedbackStore(
                        self.settings.learning_dir,
                        group_commit=self.settings.feedback_group_commit,
                        compact_rows=self.settings.feedback_compact_rows,
                    )
                except (RuntimeError, OSError) as exc:
                    self._store_error = str(exc)
                    logger.error("feedback store unavailable (Feedback: UNAVAILABLE): %s", exc)
            return self._store

    def require_store(self) -> FeedbackStore:
        """The feedback store, or UNAVAILABLE naming why it could not be opened."""
        store = self.store
        if store is None:
            raise Unavailable(
                f"feedback is not stored on this server: {self._store_error}",
                reason="FEEDBACK_STORE_UNAVAILABLE",
            )
        return store

    async def feedback(
        self, request: pb.FeedbackRequest, model: LoadedModel
    ) -> pb.FeedbackResponse:
        """Validate, join to the logged prediction and store durably; idempotent by id."""
        store = self.require_store()
        outcome = request.outcome
        close_time = (
            outcome.close_time.ToDatetime(tzinfo=UTC) if outcome.HasField("close_time") else None
        )
        record = build_record(
            prediction_id=request.prediction_id,
            pnl=outcome.pnl,
            realized_return=outcome.realized_return,
            close_time=close_time,
            features=list(request.features.values) if request.HasField("features") else None,
            prediction_log=self.log,
            model_name=model.meta.name,
            feature_count=len(model.meta.feature_names),
            already_stored=store,
            max_clock_skew_seconds=self.settings.feedback_max_clock_skew_seconds,
        )
        result = await store.append_async(record)
        if not result.duplicate:
            self.new_samples += 1
            self.arrived += 1
            if record.probability_up is not None:
                self.outcomes.append((record.probability_up >= 0.5) == bool(record.label))
        return pb.FeedbackResponse(
            prediction_id=request.prediction_id,
            duplicate=result.duplicate,
            stored_samples=result.stored_samples,
        )

    # -- what the triggers read ---------------------------------------------------------------

    def live_accuracy(self) -> float | None:
        """Share of right calls over the last window of outcomes; None until the window fills."""
        if len(self.outcomes) < (self.outcomes.maxlen or 0):
            return None
        return sum(self.outcomes) / len(self.outcomes)

    def samples(self) -> pl.DataFrame:
        """Every stored sample (blocking; call from a worker thread)."""
        return self.require_store().read_samples()

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

    def reset(self, new_samples: int) -> None:
        """After a model change: count against the new model, start the live record again."""
        self.new_samples = self.arrived = new_samples
        self.outcomes.clear()

    def job_ended(self) -> None:
        """After a retrain job, whatever its verdict: the triggers wait for new evidence."""
        self.arrived = 0
        self.outcomes.clear()

    def close(self) -> None:
        """Flush the prediction log and close the store (compacting its log)."""
        self.log.close()
        with self._store_lock:
            if self._store is not None:
                self._store.close()
            self._store_error = "closed"
