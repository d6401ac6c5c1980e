"""ModelService over gRPC: protobuf in, a call into the predictor, protobuf out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.errors import (
    OK_ITEM_STATUS,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ModelLoadError,
    abort,
    to_item_status,
)
from xylen_server.learning.feedback import Learning
from xylen_server.learning.retrainer import Retrainer
from xylen_server.serving.predictor import Predictor, Result, check_model_name, signal_for
from xylen_server.versions import history as model_history
from xylen_server.versions.swap import ModelManager

logger = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

_MODEL_TYPES = {
    "lightgbm": pb.MODEL_TYPE_LIGHTGBM,
    "xgboost": pb.MODEL_TYPE_XGBOOST,
    "catboost": pb.MODEL_TYPE_CATBOOST,
}
_ENGINES = {"onnx": pb.ENGINE_ONNX, "native": pb.ENGINE_NATIVE}


class ModelServicer(pb_grpc.ModelServiceServicer):
    """Thin: protobuf in, a call into the predictor, learning, retrainer or model manager,
    protobuf out; every error through :func:`~xylen_server.errors.abort`."""

    def __init__(
        self,
        predictor: Predictor,
        learning: Learning | None = None,
        models: ModelManager | None = None,
        retrainer: Retrainer | None = None,
    ) -> None:
        self.predictor = predictor
        self.settings = predictor.settings
        self.learning = learning
        self.models = models
        self.retrainer = retrainer

    def _response(self, result: Result) -> pb.PredictResponse:
        meta = result.model.meta
        buy, sell = self.settings.buy_threshold, self.settings.sell_threshold
        probabilities = result.probabilities.tolist()
        signals = [signal_for(probability, buy, sell) for probability in probabilities]
        response = pb.PredictResponse(
            predictions=[
                pb.Prediction(
                    prediction_id=prediction_id,
                    probability_up=probability,
                    signal=signal,
                    model_name=meta.name,
                    model_version=meta.version,
                )
                for prediction_id, probability, signal in zip(
                    result.prediction_ids, probabilities, signals, strict=True
                )
            ]
        )
        response.inference_duration.FromNanoseconds(int(result.seconds * 1e9))
        if self.learning is not None:
            self.learning.record(result, signals)
        return response

    def _learning(self) -> tuple[Learning, ModelManager, Retrainer]:
        if self.learning is None or self.models is None or self.retrainer is None:
            raise FailedPrecondition(
                "continuous learning is not set up on this server", reason="LEARNING_UNAVAILABLE"
            )
        return self.learning, self.models, self.retrainer

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        try:
            result = await self.predictor.predict(request)
        except Exception as exc:
            await abort(context, exc)
        return self._response(result)

    async def _stream_item(self, item: pb.PredictStreamRequest) -> pb.PredictStreamResponse:
        try:
            if not item.request_id:
                raise InvalidArgument(
                    "every stream item needs a request_id", reason="MISSING_REQUEST_ID"
                )
            call = self.predictor.predict(item.request)
            if item.HasField("timeout") and item.timeout.ToNanoseconds() > 0:
                seconds = item.timeout.ToNanoseconds() / 1e9
                try:
                    result = await asyncio.wait_for(call, seconds)
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"item {item.request_id!r} exceeded its {seconds * 1000:.0f} ms timeout",
                        reason="ITEM_DEADLINE_EXCEEDED",
                    ) from None
            else:
                result = await call
            return pb.PredictStreamResponse(
                request_id=item.request_id, status=OK_ITEM_STATUS, response=self._response(result)
            )
        except Exception as exc:
            return pb.PredictStreamResponse(request_id=item.request_id, status=to_item_status(exc))

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictStreamRequest], context: Context
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        """Reads items as they come, answers each as soon as it is done (up to
        ``max_stream_in_flight`` at once), and ends after the client half-closes and every
        item is answered."""
        answers: asyncio.Queue[pb.PredictStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.settings.max_stream_in_flight)
        tasks: set[asyncio.Task[None]] = set()

        async def answer(item: pb.PredictStreamRequest) -> None:
            try:
                answers.put_nowait(await self._stream_item(item))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for item in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(answer(item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
            await reader  # surfaces a broken request stream as the call's error
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def Feedback(self, request: pb.FeedbackRequest, context: Context) -> pb.FeedbackResponse:
        """Acknowledged (OK) only once the record is fsynced; the same id twice is stored once."""
        try:
            learning, _, retrainer = self._learning()
            response = await learning.feedback(request, self.predictor.model)
            if not response.duplicate:
                retrainer.check_triggers()
        except Exception as exc:
            await abort(context, exc)
        return response

    async def Retrain(self, request: pb.RetrainRequest, context: Context) -> pb.RetrainResponse:
        try:
            _, _, retrainer = self._learning()
            status = retrainer.start(request.mode, request.min_samples, request.dry_run)
        except Exception as exc:
            await abort(context, exc)
        return pb.RetrainResponse(job_id=status.job_id, status=status)

    async def WatchRetrain(
        self, request: pb.WatchRetrainRequest, context: Context
    ) -> AsyncIterator[pb.WatchRetrainResponse]:
        try:
            _, _, retrainer = self._learning()
            async for status in retrainer.watch(request.job_id):
                yield pb.WatchRetrainResponse(status=status)
        except Exception as exc:
            await abort(context, exc)

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: Context
    ) -> pb.ListModelVersionsResponse:
        try:
            check_model_name(request.model_name, self.predictor.model.meta.name)
            serving = self.predictor.model.meta.version
            kept = model_history.list_versions(self.settings.history_dir)
        except Exception as exc:
            await abort(context, exc)
        response = pb.ListModelVersionsResponse()
        for k in kept:
            item = response.versions.add(
                version=k.version,
                parent_version=k.meta.parent_version or 0,
                training_samples=k.meta.training_samples,
                serving=k.version == serving,
            )
            item.train_time.FromDatetime(_trained_at(k.meta.trained_at))
        return response

    async def RollbackModel(
        self, request: pb.RollbackModelRequest, context: Context
    ) -> pb.RollbackModelResponse:
        try:
            _, models, retrainer = self._learning()
            if retrainer.running:
                raise FailedPrecondition(
                    f"retrain job {retrainer.status.job_id} is running; roll back after it ends",
                    reason="RETRAIN_RUNNING",
                    job_id=retrainer.status.job_id,
                )
            try:
                model, previous = await models.rollback(request.version)
            except ModelLoadError as exc:
                raise FailedPrecondition(str(exc), reason="MODEL_LOAD_FAILED") from exc
        except Exception as exc:
            await abort(context, exc)
        return pb.RollbackModelResponse(model_info=self._info(model), previous_version=previous)

    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: Context
    ) -> pb.ReloadModelResponse:
        try:
            _, models, _ = self._learning()
            try:
                model, changed = await models.reload()
            except ModelLoadError as exc:
                raise FailedPrecondition(str(exc), reason="MODEL_LOAD_FAILED") from exc
        except Exception as exc:
            await abort(context, exc)
        return pb.ReloadModelResponse(model_info=self._info(model), changed=changed)

    def _info(self, model: Any) -> pb.ModelInfo:
        info = model_info(model, self.settings)
        if self.retrainer is not None:
            info.training_status.CopyFrom(self.retrainer.status)
        return info

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        try:
            model = self.predictor.model
            check_model_name(request.model_name, model.meta.name)
        except Exception as exc:
            await abort(context, exc)
        return pb.GetModelInfoResponse(model_info=self._info(model))


def _trained_at(text: str) -> datetime:
    trained_at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return trained_at if trained_at.tzinfo is not None else trained_at.replace(tzinfo=UTC)


def model_info(model: Any, settings: Any) -> pb.ModelInfo:
    meta = model.meta
    info = pb.ModelInfo(
        name=meta.name,
        model_type=_MODEL_TYPES[meta.model_type],
        version=meta.version,
        parent_version=meta.parent_version or 0,
        training_samples=meta.training_samples,
        feature_names=meta.feature_names,
        lookback=meta.lookback,
        engine=_ENGINES[model.engine.engine],
        training_status=pb.TrainingStatus(state=pb.TRAINING_STATE_IDLE),
        horizon=meta.horizon,
        buy_threshold=settings.buy_threshold,
        sell_threshold=settings.sell_threshold,
        features_hash=meta.features_hash,
    )
    info.train_time.FromDatetime(_trained_at(meta.trained_at))
    return info
