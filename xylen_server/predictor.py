"""The prediction path: the served model, where inference runs, signals and ids.

Inference runs on the engine's worker threads, except a batch of a few feature vectors whose
measured cost fits ``Settings.loop_budget_us``: handing 12 us of work to a thread costs ~80 us
and halves throughput, so the loop does it itself and is never held for longer than the budget.

The served model is one reference, read once per request, so a hot swap (replacing the
reference) never changes the model under a request that already started: every row of a batch
is answered by the same version.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass

import numpy as np

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.errors import NotFound, Unavailable
from xylen_server.inputs import feature_matrix
from xylen_server.model_store import LoadedModel
from xylen_server.settings import Settings


def signal_for(
    probability: float, buy_threshold: float, sell_threshold: float
) -> types_pb2.Signal.ValueType:
    """BUY at or above the buy threshold, SELL at or below the sell threshold, else HOLD."""
    if probability >= buy_threshold:
        return types_pb2.SIGNAL_BUY
    if probability <= sell_threshold:
        return types_pb2.SIGNAL_SELL
    return types_pb2.SIGNAL_HOLD


@dataclass(frozen=True)
class Result:
    """Probabilities for one batch and the model that computed them."""

    model: LoadedModel
    probabilities: np.ndarray
    prediction_ids: list[str]
    seconds: float


class Predictor:
    """Holds the served model and runs batches on its engine's worker threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._model: LoadedModel | None = None
        # Unique across restarts (random prefix) and cheap per row (a counter).
        self._id_prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    @property
    def model(self) -> LoadedModel:
        model = self._model
        if model is None:
            raise Unavailable("the model is still loading; retry shortly", reason="MODEL_LOADING")
        return model

    @property
    def ready(self) -> bool:
        return self._model is not None

    def install(self, model: LoadedModel) -> LoadedModel | None:
        """Serve ``model`` from now on; returns the model it replaced (still finishing calls)."""
        previous, self._model = self._model, model
        return previous

    def _run(
        self, model: LoadedModel, request: pb.PredictRequest, on_loop: bool = False
    ) -> tuple[np.ndarray, float]:
        """Validate, featurise and infer; returns P(up) and the time it took."""
        started = time.perf_counter()
        meta = model.meta
        rows = feature_matrix(
            request.inputs, len(meta.feature_names), meta.lookback, self.settings.max_batch_rows
        )
        if on_loop:
            probabilities = model.engine.predict_on_loop(rows)
        else:
            if self.settings.inference_delay_ms:
                time.sleep(self.settings.inference_delay_ms / 1000.0)
            probabilities = model.engine.predict_proba(rows)
        return probabilities, time.perf_counter() - started

    def _fits_the_loop(self, model: LoadedModel, request: pb.PredictRequest) -> bool:
        """A few feature vectors of a cheap model cost less on the loop than a thread hop."""
        inputs = request.inputs
        return (
            0 < len(inputs) <= model.loop_max_rows
            and not self.settings.inference_delay_ms
            and all(item.HasField("features") for item in inputs)
        )

    async def predict(self, request: pb.PredictRequest) -> Result:
        """Answer one Predict request on the served model, off the event loop."""
        model = self.model
        if request.model_name and request.model_name != model.meta.name:
            raise NotFound(
                f"model {request.model_name!r} is not served here; this server serves "
                f"{model.meta.name!r}",
                reason="MODEL_NOT_FOUND",
                model_name=request.model_name,
            )
        if self._fits_the_loop(model, request):
            probabilities, seconds = self._run(model, request, on_loop=True)
        else:
            loop = asyncio.get_running_loop()
            probabilities, seconds = await loop.run_in_executor(
                model.engine.executor, self._run, model, request
            )
        ids = [f"{self._id_prefix}-{next(self._counter):x}" for _ in range(len(probabilities))]
        return Result(model, probabilities, ids, seconds)
