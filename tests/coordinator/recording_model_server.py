"""A real grpc.aio ModelService on 127.0.0.1:0 that answers fixed probabilities and records
Feedback calls, run on its own event-loop thread (the model servers' Feedback is not needed)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2


class _Servicer(pb_grpc.ModelServiceServicer):
    def __init__(self, owner: RecordingModelServer) -> None:
        self.owner = owner

    def _predict(self, request: pb.PredictRequest) -> pb.PredictResponse:
        owner = self.owner
        return pb.PredictResponse(
            predictions=[
                pb.Prediction(
                    prediction_id=f"{owner.name}-{next(owner.ids)}",
                    probability_up=owner.probability,
                    signal=types_pb2.SIGNAL_HOLD,
                    model_name=owner.name,
                    model_version=1,
                )
                for _ in request.inputs
            ]
        )

    async def Predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        return self._predict(request)

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictStreamRequest], context: Any
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        async for item in request_iterator:
            yield pb.PredictStreamResponse(
                request_id=item.request_id,
                status=types_pb2.ItemStatus(code=0),
                response=self._predict(item.request),
            )

    async def Feedback(self, request: pb.FeedbackRequest, context: Any) -> pb.FeedbackResponse:
        owner = self.owner
        with owner.lock:
            owner.feedback_attempts += 1
            if owner.fail_feedback > 0:
                owner.fail_feedback -= 1
                fail = True
            else:
                fail = False
                owner.feedback.append((time.monotonic(), request))
        if fail:
            await context.abort(owner.fail_code, "injected failure")
        return pb.FeedbackResponse(prediction_id=request.prediction_id, stored_samples=1)


class RecordingModelServer:
    """Answers every row with ``probability``; records each Feedback it accepts. The next
    ``fail_feedback`` Feedback calls are answered ``fail_code`` (UNAVAILABLE unless set)."""

    def __init__(self, name: str, probability: float, fail_feedback: int = 0) -> None:
        self.name = name
        self.probability = probability
        self.fail_feedback = fail_feedback
        self.fail_code = grpc.StatusCode.UNAVAILABLE
        self.feedback_attempts = 0
        self.feedback: list[tuple[float, pb.FeedbackRequest]] = []
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self._call(self._start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        pb_grpc.add_ModelServiceServicer_to_server(_Servicer(self), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("xylen.v1.ModelService", health_pb2.HealthCheckResponse.SERVING)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def received(self) -> list[pb.FeedbackRequest]:
        with self.lock:
            return [request for _, request in self.feedback]

    def close(self) -> None:
        self._call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
