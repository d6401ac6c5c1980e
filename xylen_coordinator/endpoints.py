"""One model server as the coordinator sees it: a long-lived channel, its health, and a stream.

:class:`EndpointClient` owns

* one ``grpc.aio`` channel (HTTP/2 keepalive pings, reconnect with a short capped backoff, a
  private subchannel so no two endpoints share a connection);
* a grpc.health.v1 ``Watch`` on ``xylen.v1.ModelService``, re-established after every break,
  so :attr:`EndpointClient.serving` follows the server through loads, swaps, shutdowns and
  restarts without the coordinator restarting;
* one ``PredictStream`` on which every request is multiplexed, matched to its answer by
  ``request_id`` (unary ``Predict`` when streaming is switched off or the server lacks it).

:meth:`EndpointClient.submit` returns a future at once; the fan-out waits on all of them under
one deadline and calls :meth:`EndpointClient.forget` for the late ones, whose answers are then
dropped on arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum

import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_coordinator.breaker import Breaker
from xylen_coordinator.config import MAX_MESSAGE_BYTES, Endpoint, OutlierDetection, Transport
from xylen_coordinator.metrics import Metrics
from xylen_server import telemetry
from xylen_server.auth import bearer_metadata
from xylen_server.tls import ClientTls, open_aio_channel

logger = logging.getLogger(__name__)

MODEL_SERVICE = pb.DESCRIPTOR.services_by_name["ModelService"].full_name
#: GetModelInfo requests that votes naming unknown model versions may cause at once ...
CONFIRM_BURST = 4
#: ... and then per second, so a server lying about its version cannot make the coordinator
#: ask it in a loop.
CONFIRM_PER_SECOND = 1.0


def _short(text: str, limit: int = 64) -> str:
    """``text`` quoted, cut to ``limit`` characters (a server-chosen string in a message)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _thresholds(info: pb.ModelInfo) -> tuple[float, float] | None:
    """``info``'s (buy, sell) when they are probabilities in order (0 <= sell < buy <= 1; NaN
    is not), else None."""
    buy, sell = info.buy_threshold, info.sell_threshold
    return (buy, sell) if 0.0 <= sell < buy <= 1.0 else None


class MissingReason(StrEnum):
    """Why a server did not vote (the proto's ``MissingReason``)."""

    NOT_SERVING = "NOT_SERVING"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    ERROR = "ERROR"
    REJECTED = "REJECTED"
    EJECTED = "EJECTED"


class VoteFailure(Exception):
    """A server's answer that is not a vote."""

    def __init__(
        self,
        reason: MissingReason,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        error_reason: str = "",
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.code = code
        self.error_reason = error_reason


@dataclass(frozen=True)
class Answer:
    """A server's successful answer to one fan-out request."""

    response: pb.PredictResponse
    latency: float
    """Seconds from submission to the answer, as seen by the coordinator."""


def channel_options(transport: Transport) -> list[tuple[str, int]]:
    """Channel arguments: keepalive, reconnect backoff, message sizes, a private subchannel."""
    return [
        ("grpc.keepalive_time_ms", transport.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", transport.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", transport.reconnect_backoff_initial_ms),
        ("grpc.min_reconnect_backoff_ms", transport.reconnect_backoff_initial_ms),
        ("grpc.max_reconnect_backoff_ms", transport.reconnect_backoff_max_ms),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.enable_retries", 0),
    ]


_ITEM_CODES = {code.value[0]: code for code in grpc.StatusCode}


def failure_from_status(code: grpc.StatusCode, message: str, reason: str = "") -> VoteFailure:
    """Classify a server's error status as a missing vote."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        kind = MissingReason.DEADLINE_EXCEEDED
    elif code == grpc.StatusCode.UNAVAILABLE:
        kind = MissingReason.UNAVAILABLE
    else:
        kind = MissingReason.ERROR
    return VoteFailure(kind, f"{code.name}: {message}", code=code, error_reason=reason)


def _error_reason(error: grpc.aio.AioRpcError) -> str:
    """The google.rpc.ErrorInfo reason in an error's trailers, if any."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except Exception:
        return ""
    if status is None:
        return ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def failure_from_rpc_error(error: grpc.aio.AioRpcError) -> VoteFailure:
    return failure_from_status(error.code(), error.details() or "", _error_reason(error))


def _core_broke(error: grpc.aio.AioRpcError) -> bool:
    """The client's gRPC core ended the call (the connection broke under it), not the server."""
    return (
        error.code() == grpc.StatusCode.INTERNAL and error.details() == "Internal error from Core"
    )


class _Stream:
    """One open PredictStream and the requests waiting for their answers."""

    def __init__(
        self, stub: pb_grpc.ModelServiceStub, name: str, metadata: tuple[tuple[str, str], ...]
    ) -> None:
        self.name = name
        self._to_send: asyncio.Queue[pb.PredictStreamRequest | None] = asyncio.Queue()
        self.pending: dict[str, tuple[asyncio.Future[Answer], float]] = {}
        self.closed = False
        self.unimplemented = False
        self._call = stub.PredictStream(self._requests(), metadata=metadata)
        self._reader = asyncio.create_task(self._read(), name=f"stream-reader-{name}")

    async def _requests(self) -> AsyncIterator[pb.PredictStreamRequest]:
        while (item := await self._to_send.get()) is not None:
            yield item

    def send(self, item: pb.PredictStreamRequest, future: asyncio.Future[Answer]) -> None:
        self.pending[item.request_id] = (future, time.perf_counter())
        self._to_send.put_nowait(item)

    def half_close(self) -> None:
        """No more requests: the server answers what it has and then ends the stream."""
        if not self.closed:
            self.closed = True
            self._to_send.put_nowait(None)

    async def _read(self) -> None:
        failure: VoteFailure
        try:
            async for response in self._call:
                entry = self.pending.pop(response.request_id, None)
                if entry is None:
                    continue  # a late answer whose request was given up: dropped
                future, sent = entry
                if future.done():
                    continue
                if response.status.code == 0:
                    future.set_result(Answer(response.response, time.perf_counter() - sent))
                else:
                    code = _ITEM_CODES.get(response.status.code, grpc.StatusCode.UNKNOWN)
                    future.set_exception(
                        failure_from_status(code, response.status.message, response.status.reason)
                    )
            failure = VoteFailure(MissingReason.UNAVAILABLE, "the server ended the stream")
        except grpc.aio.AioRpcError as error:
            self.unimplemented = error.code() == grpc.StatusCode.UNIMPLEMENTED
            failure = failure_from_rpc_error(error)
            if error.code() == grpc.StatusCode.UNAVAILABLE or _core_broke(error):
                # A killed server's stream can also end as INTERNAL "Internal error from Core".
                failure = VoteFailure(
                    MissingReason.UNAVAILABLE,
                    f"connection lost: {error.details()}",
                    code=grpc.StatusCode.UNAVAILABLE,
                )
        except asyncio.CancelledError:
            failure = VoteFailure(MissingReason.UNAVAILABLE, "the coordinator closed the stream")
            raise
        finally:
            self.half_close()  # ends the request iterator, so grpc's writer task finishes
            self._call.cancel()
            pending, self.pending = self.pending, {}
            for future, _ in pending.values():
                if not future.done():
                    future.set_exception(failure)
                    future.exception()  # mark retrieved: nobody may be waiting any more

    async def close(self, grace: float) -> None:
        self.half_close()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._reader), grace)
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class EndpointClient:
    """The coordinator's long-lived connection to one model server."""

    def __init__(
        self,
        endpoint: Endpoint,
        transport: Transport,
        tls: ClientTls | None = None,
        token: str = "",
        *,
        outlier_detection: OutlierDetection | None = None,
        metrics: Metrics | None = None,
        on_serving: Callable[[], None] = lambda: None,
    ) -> None:
        self.endpoint = endpoint
        self._on_serving = on_serving
        """Called each time the server's health turns SERVING (its replica set listens)."""
        self.name = endpoint.name
        self.transport = transport
        self.tls = tls
        self.token = token
        self._metadata = bearer_metadata(token)
        self.channel = open_aio_channel(endpoint.address, tls, channel_options(transport))
        self.stub = pb_grpc.ModelServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.serving = False
        self.features_hash = ""
        """The server's ModelInfo.features_hash, learnt each time it turns SERVING."""
        self.info: pb.ModelInfo | None = None
        """The server's ModelInfo, learnt each time it turns SERVING or answers with a model
        version other than the one learnt (its label definition and thresholds)."""
        self.health_detail = "health not known yet"
        self.health_known = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._stream: _Stream | None = None
        self._use_stream = transport.use_stream
        self._ids = itertools.count(1)
        self._closing = False
        self._learning: asyncio.Future[None] | None = None
        self.reported_model_name = ""
        """The model name the server gave in GetModelInfo."""
        self.known_versions: set[int] = set()
        """Model versions the server reported in GetModelInfo (the latest few)."""
        self._confirm_tokens = float(CONFIRM_BURST)
        self._confirm_stamp = time.monotonic()
        self.metrics = metrics or Metrics()
        self.breaker = Breaker(
            self.name,
            outlier_detection or OutlierDetection(),
            self._probe,
            on_eject=lambda: self.metrics.ejected(self.name),
            on_rejoin=lambda: self.metrics.rejoined(self.name),
        )

    def start(self) -> None:
        """Start following the server's health (idempotent)."""
        if self._watch is None:
            self._watch = asyncio.create_task(self._watch_health(), name=f"health-{self.name}")

    def _set_health(self, serving: bool, detail: str) -> None:
        if serving != self.serving:
            logger.info("%s (%s): %s", self.name, self.endpoint.address, detail)
            self.features_hash = ""
            self.info = None
            if serving:
                self._learning = asyncio.ensure_future(self._learn_features())
                if self.breaker.ejected:
                    # The server said SERVING again (restarted, reconnected): let it back in.
                    logger.warning("%s rejoined: its health turned SERVING", self.name)
                    self.breaker.reset()
                self._on_serving()
        self.serving = serving
        self.health_detail = detail
        self.health_known.set()
        if not serving and self._stream is not None:
            # Let a draining server finish: answer what it has, then end the stream.
            self._stream.half_close()

    async def _watch_health(self) -> None:
        backoff_max = self.transport.reconnect_backoff_max_ms / 1000
        delay = self.transport.reconnect_backoff_initial_ms / 1000
        request = health_pb2.HealthCheckRequest(service=MODEL_SERVICE)
        while not self._closing:
            call = self._health.Watch(request)
            try:
                async for response in call:
                    delay = self.transport.reconnect_backoff_initial_ms / 1000
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                    self._set_health(
                        response.status == health_pb2.HealthCheckResponse.SERVING,
                        f"health {status}",
                    )
                self._set_health(False, "health watch ended by the server")
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.CANCELLED and self._closing:
                    return
                self._set_health(False, f"unreachable: {error.code().name}: {error.details()}")
            except asyncio.CancelledError:
                call.cancel()
                raise
            await asyncio.sleep(delay)
            delay = min(backoff_max, delay * 2)

    async def _learn_features(self) -> None:
        """Ask the server which feature definitions its model uses (a swap keeps them: a server
        refuses models whose definitions differ from its code)."""
        try:
            info = await self.model_info()
        except grpc.aio.AioRpcError as error:
            logger.info("%s: no model info (%s); sending it candles", self.name, error.code().name)
            return
        self.info = info
        self.features_hash = info.features_hash
        self._learn_model(info)
        if (info.buy_threshold or info.sell_threshold) and _thresholds(info) is None:
            logger.warning(
                "%s reports thresholds buy=%.6g sell=%.6g, not 0 <= sell < buy <= 1: the "
                "ensemble counts it with the configured thresholds",
                self.name,
                info.buy_threshold,
                info.sell_threshold,
            )

    def _learn_model(self, info: pb.ModelInfo) -> None:
        self.reported_model_name = info.name
        if info.version not in self.known_versions:
            self.known_versions.add(info.version)
            while len(self.known_versions) > 16:
                self.known_versions.discard(min(self.known_versions))

    @property
    def expected_model_name(self) -> str:
        """The model name every vote must carry: configured, else reported (empty: unknown)."""
        return self.endpoint.model_name or self.reported_model_name

    def _take_confirm_token(self) -> bool:
        """A token of the bucket that bounds the GetModelInfo calls unknown versions cause
        (:data:`CONFIRM_BURST` at once, then :data:`CONFIRM_PER_SECOND`)."""
        now = time.monotonic()
        elapsed, self._confirm_stamp = now - self._confirm_stamp, now
        self._confirm_tokens = min(
            float(CONFIRM_BURST), self._confirm_tokens + elapsed * CONFIRM_PER_SECOND
        )
        if self._confirm_tokens < 1.0:
            return False
        self._confirm_tokens -= 1.0
        return True

    def _confirmed(self, name: str, version: int) -> bool:
        info = self.info
        return version in self.known_versions and info is not None and info.name == name

    async def confirm_version(self, name: str, version: int) -> str | None:
        """Ask the server's GetModelInfo whether it serves model ``name`` at ``version`` (a
        vote carried a version not known yet: a swap, a rollback, a restore?).

        None when it does (``version`` is then in :attr:`known_versions`), else why not, in a
        short message. Single-flight: a request already in flight is awaited, not doubled; a
        server that keeps naming versions it does not confirm gets at most
        :data:`CONFIRM_PER_SECOND` requests a second (after a burst of :data:`CONFIRM_BURST`).
        The caller bounds the wait (the request itself goes on, shielded)."""
        for _ in range(2):  # one in flight may predate the swap: then ask once more
            if self._confirmed(name, version):
                return None
            learning = self._learning
            if learning is None or learning.done():
                if not self._take_confirm_token():
                    return "GetModelInfo not asked again so soon"
                learning = self._learning = asyncio.ensure_future(self._learn_features())
                fresh = True
            else:
                fresh = False
            try:
                await asyncio.shield(learning)
            except Exception as error:
                return f"GetModelInfo failed: {type(error).__name__}"
            if fresh:
                break
        if self._confirmed(name, version):
            return None
        info = self.info
        if info is None:
            return "GetModelInfo did not answer"
        return f"GetModelInfo reports {_short(info.name)} version {info.version}"

    async def _probe(self, timeout: float) -> str | None:
        """grpc.health.v1 Check of an ejected server: None when SERVING, else why not."""
        request = health_pb2.HealthCheckRequest(service=MODEL_SERVICE)
        try:
            response = await self._health.Check(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}"
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return None

    @property
    def learning(self) -> bool:
        """A model-info request is in flight."""
        return self._learning is not None and not self._learning.done()

    async def learnt(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a model-info request in flight."""
        learning = self._learning
        if learning is not None and not learning.done():
            await asyncio.wait([learning], timeout=timeout)

    def notice_version(self, version: int) -> None:
        """Learn the model info again when the server answered with another model version
        (a swap, a rollback or a restore may bring other thresholds)."""
        info = self.info
        learning = self._learning
        if info is None or info.version == version or (learning and not learning.done()):
            return
        self._learning = asyncio.ensure_future(self._learn_features())

    @property
    def label(self) -> tuple[int, float, float] | None:
        """What the server's probability means: (horizon, fee, label threshold); None while
        its model info is not known."""
        info = self.info
        return None if info is None else (info.horizon, info.fee, info.label_threshold)

    @property
    def thresholds(self) -> tuple[float, float] | None:
        """The (buy, sell) thresholds the server applies to its own model; None when unknown
        or not probabilities in order (a server reporting buy=1e9 moved the ensemble's own
        threshold to 5e8, so that a unanimous 0.9 was HOLD)."""
        info = self.info
        return None if info is None else _thresholds(info)

    def _open_stream(self) -> _Stream:
        stream = self._stream
        if stream is None or stream.closed:
            if stream is not None and stream.unimplemented:
                logger.warning("%s has no PredictStream; using unary Predict", self.name)
                self._use_stream = False
            stream = _Stream(self.stub, self.name, self._metadata)
            self._stream = stream
        return stream

    def submit(self, request: pb.PredictRequest, timeout: float) -> asyncio.Future[Answer]:
        """Send ``request`` now; the future resolves to an :class:`Answer` or a
        :class:`VoteFailure`. ``timeout`` (seconds) travels to the server as the item's timeout
        (stream) or the call's deadline (unary)."""
        loop = asyncio.get_running_loop()
        if self._use_stream:
            stream = self._open_stream()
            if self._use_stream:
                future: asyncio.Future[Answer] = loop.create_future()
                budget = duration_pb2.Duration()
                budget.FromNanoseconds(max(1, int(timeout * 1e9)))
                item = pb.PredictStreamRequest(
                    request_id=str(next(self._ids)), request=request, timeout=budget
                )
                if telemetry.tracing_enabled():
                    self._trace(item, future)
                stream.send(item, future)
                return future
        return asyncio.ensure_future(self._unary(request, timeout))

    def _trace(self, item: pb.PredictStreamRequest, future: asyncio.Future[Answer]) -> None:
        """A client span for this server's vote, ended with the answer, whose context travels
        with the stream item (the stream itself outlives every call)."""
        span = telemetry.tracer(__name__).start_span(
            "xylen.v1.ModelService/PredictStream item",
            kind=SpanKind.CLIENT,
            attributes={"xylen.endpoint": self.name, "xylen.request_id": item.request_id},
        )
        item.trace_context.update(telemetry.inject_context(set_span_in_context(span)))

        def done(answered: asyncio.Future[Answer]) -> None:
            if answered.cancelled():
                span.set_status(Status(StatusCode.ERROR, "no answer in time"))
            elif answered.exception() is not None:
                span.set_status(Status(StatusCode.ERROR, str(answered.exception())[:200]))
            span.end()

        future.add_done_callback(done)

    async def _unary(self, request: pb.PredictRequest, timeout: float) -> Answer:
        started = time.perf_counter()
        metadata = self._metadata
        if telemetry.tracing_enabled():
            metadata = (*metadata, *telemetry.inject_context().items())
        try:
            response = await self.stub.Predict(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            raise failure_from_rpc_error(error) from None
        return Answer(response, time.perf_counter() - started)

    def forget(self, future: asyncio.Future[Answer]) -> None:
        """Give up on ``future``: its answer, if it ever comes, is dropped."""
        stream = self._stream
        if stream is not None:
            for request_id, (pending, _) in list(stream.pending.items()):
                if pending is future:
                    del stream.pending[request_id]
                    break
        future.cancel()

    async def feedback(self, request: pb.FeedbackRequest, timeout: float) -> pb.FeedbackResponse:
        """Forward one outcome to the server's Feedback RPC (raises ``grpc.aio.AioRpcError``)."""
        return await self.stub.Feedback(request, timeout=timeout, metadata=self._metadata)

    async def model_info(self, timeout: float = 2.0) -> pb.ModelInfo:
        """The server's GetModelInfo (raises ``grpc.aio.AioRpcError``)."""
        response = await self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata
        )
        return response.model_info

    async def close(self, grace: float = 1.0) -> None:
        """Half-close the stream, give answers in flight ``grace`` seconds, close the channel."""
        self._closing = True
        await self.breaker.close()
        if self._stream is not None:
            await self._stream.close(grace)
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.channel.close()
