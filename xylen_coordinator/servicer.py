"""EnsembleService over gRPC: protobuf in, a call into the coordinator, protobuf out; errors
become status in :class:`~xylen_server.errors.ErrorStatusInterceptor`."""

from __future__ import annotations

import logging
from typing import Any, TypeAlias

import grpc

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import ensemble_service_pb2_grpc as epb_grpc
from xylen_coordinator import convert
from xylen_coordinator.coordinator import AsyncCoordinator
from xylen_server.errors import InvalidArgument, ResourceExhausted

logger = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

#: Time kept back from the caller's own deadline to build and send the answer.
_REPLY_MARGIN_SECONDS = 0.002


class EnsembleServicer(epb_grpc.EnsembleServiceServicer):
    def __init__(self, coordinator: AsyncCoordinator) -> None:
        self.coordinator = coordinator
        self.in_flight = 0
        """Predict calls being worked on now."""
        self.shed = 0
        """Predict calls refused as OVERLOADED since start."""

    async def Predict(
        self, request: epb.EnsembleServicePredictRequest, context: Context
    ) -> epb.EnsembleServicePredictResponse:
        timeout: float | None = None
        if request.HasField("timeout"):
            seconds, nanos = request.timeout.seconds, request.timeout.nanos
            if not -1_000_000_000 < nanos < 1_000_000_000 or seconds * nanos < 0:
                raise InvalidArgument(
                    "timeout is not a valid Duration (nanos out of range or of another sign)",
                    reason="INVALID_TIMEOUT",
                )
            if request.timeout.ToNanoseconds() > 0:
                timeout = request.timeout.ToNanoseconds() / 1e9
        remaining = context.time_remaining()
        if remaining is not None:
            budget = timeout or self.coordinator.config.deadline_ms / 1000
            timeout = max(0.001, min(budget, remaining - _REPLY_MARGIN_SECONDS))
        limit = self.coordinator.config.max_concurrent_predicts
        if self.in_flight >= limit:
            self.shed += 1
            if self.shed == 1 or self.shed % 1000 == 0:
                logger.warning("Predict shed (%d so far): %d calls in flight", self.shed, limit)
            raise ResourceExhausted(
                f"{limit} Predict calls in flight, the most max_concurrent_predicts allows; "
                "retry shortly",
                reason="OVERLOADED",
                limit=limit,
            )
        self.in_flight += 1
        try:
            result = await self.coordinator.predict(list(request.inputs), timeout)
        finally:
            self.in_flight -= 1
        return convert.predict_response(result)

    async def Feedback(
        self, request: epb.EnsembleServiceFeedbackRequest, context: Context
    ) -> epb.EnsembleServiceFeedbackResponse:
        ack = await self.coordinator.feedback(
            request.prediction_id, request.outcome if request.HasField("outcome") else None
        )
        return convert.feedback_response(ack)

    async def GetEnsembleInfo(
        self, request: epb.GetEnsembleInfoRequest, context: Context
    ) -> epb.GetEnsembleInfoResponse:
        pending = await self.coordinator.pending_feedback()
        return convert.info_response(self.coordinator.config, self.coordinator.endpoints(), pending)
