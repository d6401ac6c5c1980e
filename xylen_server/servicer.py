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
    InvalidArgument,
    NotFound,
    Unimplemented,
    abort,
    to_item_status,
)
from xylen_server.predictor import Predictor, Result, signal_for

logger = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

_MODEL_TYPES = {
    "lightgbm": pb.MODEL_TYPE_LIGHTGBM,
    "xgboost": pb.MODEL_TYPE_XGBOOST,
    "catboost": pb.MODEL_TYPE_CATBOOST,
}
_ENGINES = {"onnx": pb.ENGINE_ONNX, "native": pb.ENGINE_NATIVE}


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.settings = predictor.settings

    def _response(self, result: Result) -> pb.PredictResponse:
        meta = result.model.meta
        buy, sell = self.settings.buy_threshold, self.settings.sell_threshold
        response = pb.PredictResponse(
            predictions=[
                pb.Prediction(
                    prediction_id=prediction_id,
                    probability_up=probability,
                    signal=signal_for(probability, buy, sell),
                    model_name=meta.name,
                    model_version=meta.version,
                )
                for prediction_id, probability in zip(
                    result.prediction_ids, result.probabilities.tolist(), strict=True
                )
            ]
        )
        response.inference_duration.FromNanoseconds(int(result.seconds * 1e9))
        return response

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
        await abort(
            context,
            Unimplemented(
                "Feedback is not available on this server yet", reason="FEEDBACK_UNAVAILABLE"
            ),
        )

    async def Retrain(self, request: pb.RetrainRequest, context: Context) -> pb.RetrainResponse:
        await abort(
            context,
            Unimplemented(
                "Retrain is not available on this server yet", reason="RETRAIN_UNAVAILABLE"
            ),
        )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        try:
            model = self.predictor.model
            if request.model_name and request.model_name != model.meta.name:
                raise NotFound(
                    f"model {request.model_name!r} is not served here; this server serves "
                    f"{model.meta.name!r}",
                    reason="MODEL_NOT_FOUND",
                    model_name=request.model_name,
                )
        except Exception as exc:
            await abort(context, exc)
        return pb.GetModelInfoResponse(model_info=model_info(model, self.settings))


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
    trained_at = datetime.fromisoformat(meta.trained_at.replace("Z", "+00:00"))
    if trained_at.tzinfo is None:
        trained_at = trained_at.replace(tzinfo=UTC)
    info.train_time.FromDatetime(trained_at)
    return info
