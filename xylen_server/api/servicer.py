"""ModelService over gRPC: protobuf in, one domain call, protobuf out.

No rules live here: validation, thresholds, triggers and version rules are the domain's
(:mod:`~xylen_server.serving`, :mod:`~xylen_server.versions`, :mod:`~xylen_server.learning`),
the messages are :mod:`~xylen_server.api.messages`', and every exception a handler raises
becomes its status by the :class:`~xylen_server.errors.ErrorStatusInterceptor`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server import auth, telemetry
from xylen_server.api import limits, messages
from xylen_server.api.admission import AdmissionInterceptor
from xylen_server.errors import InvalidArgument, ResourceExhausted
from xylen_server.learning.feedback import FeedbackLoop
from xylen_server.learning.retrainer import Retrainer
from xylen_server.serving.predictor import Predictor, Result
from xylen_server.versions.swap import ModelManager

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class ModelServicer(pb_grpc.ModelServiceServicer):
    """The model server's RPCs over its predictor, feedback loop, retrainer and versions."""

    def __init__(
        self,
        predictor: Predictor,
        feedback: FeedbackLoop,
        models: ModelManager,
        retrainer: Retrainer,
        admission: AdmissionInterceptor | None = None,
    ) -> None:
        self.admission = admission
        """Charges stream items to the bytes-in-flight budget (None: no budget)."""
        self.predictor = predictor
        self.settings = predictor.settings
        self.feedback = feedback
        self.models = models
        self.retrainer = retrainer
        if not self.settings.trace_hooks:
            self.Predict = self._predict_without_hooks  # type: ignore[method-assign]

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        remaining = context.time_remaining()
        result = self.predictor.answer(  # no coroutine of the predictor's on the usual path
            request,
            None if remaining is None else time.monotonic() + remaining,
            otel_context.get_current() if telemetry.tracing_enabled() else None,
        )
        if result.__class__ is not Result:
            result = await result  # type: ignore[misc]
        return messages.predict_response(result)  # type: ignore[arg-type]

    async def _predict_without_hooks(
        self, request: pb.PredictRequest, context: Context
    ) -> pb.PredictResponse:
        """Predict as a server built with no trace hooks runs it (``TRACE_HOOKS=false``): the
        baseline ``make bench`` measures tracing off against."""
        remaining = context.time_remaining()
        result = self.predictor.answer(
            request, None if remaining is None else time.monotonic() + remaining
        )
        if result.__class__ is not Result:
            result = await result  # type: ignore[misc]
        return messages.predict_response(result)  # type: ignore[arg-type]

    async def _stream_item(
        self, item: pb.PredictStreamRequest, deadline: float | None
    ) -> pb.PredictStreamResponse:
        if item.trace_context and telemetry.tracing_enabled():
            # One stream carries many items: each brings its caller's trace context.
            with telemetry.tracer(__name__).start_as_current_span(
                "xylen.v1.ModelService/PredictStream item",
                context=telemetry.extract_context(item.trace_context),
                kind=SpanKind.SERVER,
            ) as span:
                span.set_attribute("xylen.request_id", item.request_id[:64])
                span.set_attribute("xylen.model", self.settings.model_name)
                answer = await self._answer_item(item, deadline)
                span.set_attribute("xylen.status_code", answer.status.code)
                return answer
        return await self._answer_item(item, deadline)

    async def _answer_item(
        self, item: pb.PredictStreamRequest, deadline: float | None
    ) -> pb.PredictStreamResponse:
        request_id = item.request_id
        try:
            if not request_id:
                raise InvalidArgument(
                    "every stream item needs a request_id", reason="MISSING_REQUEST_ID"
                )
            try:
                limits.check_request_id(request_id, self.settings)
            except InvalidArgument:
                request_id = ""  # never echo an over-long id back
                raise
            seconds = limits.timeout_seconds(item)
            limits.check_predict(item.request, self.settings)
            if seconds > 0:
                item_deadline = time.monotonic() + seconds
                deadline = item_deadline if deadline is None else min(deadline, item_deadline)
            result = await self.predictor.predict_within(
                item.request,
                seconds,
                deadline,
                otel_context.get_current() if telemetry.tracing_enabled() else None,
            )
            return messages.stream_answer(request_id, result)
        except Exception as exc:  # one bad item is its own answer, never the stream's end
            return messages.stream_error(request_id, exc)

    def _echoed_id(self, item: pb.PredictStreamRequest) -> str:
        """The item's request_id to echo in an answer: empty when it is over its limit."""
        try:
            limits.check_request_id(item.request_id, self.settings)
        except InvalidArgument:
            return ""
        return item.request_id

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictStreamRequest], context: Context
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        """Reads items as they come, answers each as soon as it is done, and ends after the
        client half-closes and every item is answered.

        At most ``max_stream_in_flight`` items are held at once, from the moment one is read
        until its answer has been written: a client that stops reading its answers stops the
        server reading its requests (HTTP/2 flow control does the rest), so neither side's
        queue grows without bound. Each item's bytes count against ``MAX_INFLIGHT_BYTES``
        for as long; an item that would pass it is answered RESOURCE_EXHAUSTED
        (BYTES_IN_FLIGHT) on its own. An item whose ``request_id`` is that of an item still
        in flight is answered INVALID_ARGUMENT (DUPLICATE_REQUEST_ID) on its own: two answers
        with one id could not be told apart (an id may be used again once its answer is out).
        """
        answers: asyncio.Queue[pb.PredictStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.settings.max_stream_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        deadline = _deadline(context)

        admission = self.admission
        # id(answer) -> (bytes its item holds, its request id) until the answer is written
        held: dict[int, tuple[int, str]] = {}
        outstanding = 0  # bytes taken from the budget by this stream and not given back
        in_flight: set[str] = set()  # request ids of the items read and not yet answered

        async def answer(item: pb.PredictStreamRequest, size: int) -> None:
            response = await self._stream_item(item, deadline)
            held[id(response)] = (size, item.request_id)
            answers.put_nowait(response)

        async def read() -> None:
            nonlocal outstanding
            try:
                async for item in request_iterator:
                    await slots.acquire()
                    request_id = item.request_id
                    if request_id in in_flight:
                        duplicate = InvalidArgument(
                            "request_id is that of an item still in flight on this stream; "
                            "ids must be unique among the items awaiting an answer",
                            reason="DUPLICATE_REQUEST_ID",
                        )
                        answers.put_nowait(messages.stream_error(self._echoed_id(item), duplicate))
                        continue
                    size = item.ByteSize() if admission is not None else 0
                    if admission is not None:
                        try:
                            admission.take_bytes(size)
                        except ResourceExhausted as exc:  # this item only; the stream goes on
                            answers.put_nowait(messages.stream_error(self._echoed_id(item), exc))
                            continue
                        outstanding += size
                    if request_id:  # a missing one is refused by the item's own checks
                        in_flight.add(request_id)
                    task = asyncio.create_task(answer(item, size))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response  # returns once grpc has taken the message
                slots.release()
                size, request_id = held.pop(id(response), (0, ""))
                in_flight.discard(request_id)
                if admission is not None and size:
                    admission.give_bytes(size)
                    outstanding -= size
            await reader  # surfaces a broken request stream as the call's error
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            if admission is not None:
                admission.give_bytes(outstanding)

    async def Feedback(self, request: pb.FeedbackRequest, context: Context) -> pb.FeedbackResponse:
        """Acknowledged (OK) only once the record is committed (fsynced); the same id twice is
        stored once."""
        outcome = request.outcome
        stored = await self.feedback.feedback(
            self.predictor.model,
            request.prediction_id,
            outcome.pnl,
            outcome.realized_return,
            (outcome.close_time.seconds, outcome.close_time.nanos)
            if outcome.HasField("close_time")
            else None,
            list(request.features.values) if request.HasField("features") else None,
            side=outcome.side,
            underlying_log_return=outcome.underlying_log_return
            if outcome.HasField("underlying_log_return")
            else None,
            source=auth.caller(),
        )
        return messages.feedback_response(request.prediction_id, stored)

    async def Retrain(self, request: pb.RetrainRequest, context: Context) -> pb.RetrainResponse:
        status = self.retrainer.start(request.mode, request.min_samples, request.dry_run)
        return pb.RetrainResponse(job_id=status.job_id, status=status)

    async def WatchRetrain(
        self, request: pb.WatchRetrainRequest, context: Context
    ) -> AsyncIterator[pb.WatchRetrainResponse]:
        async for status in self.retrainer.watch(request.job_id):
            yield pb.WatchRetrainResponse(status=status)

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: Context
    ) -> pb.ListModelVersionsResponse:
        serving = self.predictor.model_named(request.model_name).meta.version
        return messages.versions_response(await self.models.kept_versions(), serving)

    async def RollbackModel(
        self, request: pb.RollbackModelRequest, context: Context
    ) -> pb.RollbackModelResponse:
        model, previous = await self.retrainer.rollback(request.version)
        return pb.RollbackModelResponse(model_info=self._info(model), previous_version=previous)

    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: Context
    ) -> pb.ReloadModelResponse:
        model, changed = await self.models.reload()
        return pb.ReloadModelResponse(model_info=self._info(model), changed=changed)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        model = self.predictor.model_named(request.model_name)
        return pb.GetModelInfoResponse(model_info=self._info(model))

    def _info(self, model: Any) -> pb.ModelInfo:
        return messages.model_info(model, self.settings, self.retrainer.status)


def _deadline(context: Context) -> float | None:
    """The call's deadline on the ``time.monotonic`` clock, or None when it has none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
