"""A real grpc.aio ModelService on 127.0.0.1:0 that says whatever the test tells it to: a
probability that is NaN, infinite or outside [0, 1], another model's name, a version it never
reported. Its GetModelInfo tells the truth (``info_name``, ``info_version``); health is SERVING.
Run by an event loop on its own thread; the fields can be changed while it serves."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2


class _Servicer(pb_grpc.ModelServiceServicer):
    def __init__(self, owner: LyingModelServer) -> None:
        self.owner = owner

    def _predict(self, request: pb.PredictRequest) -> pb.PredictResponse:
        owner = self.owner
        return pb.PredictResponse(
            predictions=[
                pb.Prediction(
                    prediction_id=f"{owner.info_name}-{next(owner.ids)}{owner.id_padding}",
                    probability_up=owner.probability,
                    signal=types_pb2.SIGNAL_HOLD,
                    model_name=owner.model_name,
                    model_version=owner.model_version,
                )
                for _ in request.inputs
            ]
        )

    async def Predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        if self.owner.delay:
            await asyncio.sleep(self.owner.delay)
        return self._predict(request)

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictStreamRequest], context: Any
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        async for item in request_iterator:
            if self.owner.delay:
                await asyncio.sleep(self.owner.delay)
            if self.owner.shedding:  # as a model server at its limit answers an item
                yield pb.PredictStreamResponse(
                    request_id=item.request_id,
                    status=types_pb2.ItemStatus(
                        code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                        message="the server is at its limit; retry later",
                        reason="OVERLOADED",
                    ),
                )
                continue
            yield pb.PredictStreamResponse(
                request_id=item.request_id,
                status=types_pb2.ItemStatus(code=0),
                response=self._predict(item.request),
            )

    async def Feedback(self, request: pb.FeedbackRequest, context: Any) -> pb.FeedbackResponse:
        owner = self.owner
        if owner.forgot_predictions and not request.HasField("features"):
            await context.abort(grpc.StatusCode.NOT_FOUND, "prediction unknown; send features")
        owner.feedback.append(request)
        return pb.FeedbackResponse(prediction_id=request.prediction_id, stored_samples=1)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Any
    ) -> pb.GetModelInfoResponse:
        owner = self.owner
        owner.info_calls += 1
        if owner.info_delay:
            await asyncio.sleep(owner.info_delay)
        return pb.GetModelInfoResponse(
            model_info=pb.ModelInfo(
                name=owner.info_name,
                version=owner.info_version,
                features_hash=owner.features_hash,
                horizon=owner.horizon,
                fee=owner.fee,
                label_threshold=owner.label_threshold,
                buy_threshold=owner.buy_threshold,
                sell_threshold=owner.sell_threshold,
            )
        )


class LyingModelServer:
    """Answers every row with ``probability``, ``model_name`` and ``model_version``."""

    def __init__(self, name: str, probability: float = 0.5, features_hash: str = "") -> None:
        self.info_name = name
        self.info_version = 1
        self.probability = probability
        self.model_name = name
        self.model_version = 1
        self.info_calls = 0
        self.id_padding = ""
        """Appended to every prediction id."""
        self.delay = 0.0
        """Seconds to wait before answering each Predict (health stays SERVING)."""
        self.forgot_predictions = False
        """Feedback without features is NOT_FOUND (as after a kill -9 lost the prediction)."""
        self.feedback: list[pb.FeedbackRequest] = []
        self.features_hash = features_hash
        """Reported in GetModelInfo: the coordinator's own makes it send features."""
        self.horizon = 0
        self.fee = 0.0
        self.label_threshold = 0.0
        """Reported in GetModelInfo: what ``probability`` means (0, 0.0, 0.0 unless set)."""
        self.buy_threshold = 0.0
        self.sell_threshold = 0.0
        """Reported in GetModelInfo (0 and 0: none, unless set)."""
        self.info_delay = 0.0
        """Seconds GetModelInfo waits before answering."""
        self.shedding = False
        """Every PredictStream item is refused RESOURCE_EXHAUSTED (reason OVERLOADED)."""
        self.ids = itertools.count(1)
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

    def tell_the_truth(self) -> None:
        self.id_padding = ""
        self.probability = 0.5
        self.model_name = self.info_name
        self.model_version = self.info_version

    def close(self) -> None:
        self._call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
