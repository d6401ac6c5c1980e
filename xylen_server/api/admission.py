"""What a request must pass before any work is done for it: that its bytes decode, that it
fits the server's load, and that its fields fit their limits.

:class:`AdmissionInterceptor` sits innermost on every call (inside the error and metrics
interceptors, so its refusals get their status, ErrorInfo and count like any other error):

- **Undecodable bytes.** grpc's Python server answers a request whose deserializer raises with
  UNKNOWN, the exception's name and a logged traceback per call. The interceptor wraps every
  method's deserializer so that it never raises: bytes that do not parse become
  :class:`~xylen_server.decoding.Undecodable`, and the call is answered INVALID_ARGUMENT (reason
  UNDECODABLE_REQUEST) with a short message; the ``undecodable`` counter goes up, the log stays
  quiet. A stream's undecodable message ends the stream the same way.
- **Load shedding (unary calls).** At most ``MAX_CONCURRENT_RPCS`` run at once and
  ``MAX_QUEUED_RPCS`` wait, first come first served; one more is refused at once with
  RESOURCE_EXHAUSTED (reason OVERLOADED, counter ``shed``). Request bytes of admitted calls
  are bounded by ``MAX_INFLIGHT_BYTES`` (reason BYTES_IN_FLIGHT). A call whose deadline has
  passed or that was cancelled while it waited is dropped before it runs (counters
  ``expired`` / ``cancelled``). grpc.health.v1 Check is never queued, so probes stay answered.
- **Calls arriving.** grpc itself refuses a call beyond running + queued + streams
  (:attr:`AdmissionInterceptor.call_limit`) as the server's event loop takes it up
  (RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!", no ErrorInfo), before any handler
  runs: this bound keeps the calls waiting on the loop and their memory short. Calls that
  arrive while the loop is stalled are held by grpc's core until it runs again, and are
  not cancelled for their age short of ``UNREQUESTED_CALL_TIMEOUT_SECONDS``
  (:attr:`AdmissionInterceptor.core_options`).
- **Streams.** At most ``MAX_CONCURRENT_STREAMS`` streaming calls are open at once (reason
  TOO_MANY_STREAMS).
- **Field limits.** :func:`xylen_server.api.limits.check_request` on every unary request.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from xylen_server.api.limits import check_request
from xylen_server.api.metrics import Recorder
from xylen_server.decoding import Undecodable, refusal, tolerant
from xylen_server.errors import (
    DeadlineExceeded,
    HandlerInterceptor,
    ResourceExhausted,
    wrap_behaviors,
)
from xylen_server.settings import Settings

#: Methods never queued or shed: a load balancer's or KServe's probe must be answered under
#: load (a liveness probe failing because the server is busy would get it restarted).
UNQUEUED = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/inference.GRPCInferenceService/ModelReady",
    }
)


class Sized:
    """A decoded request and the size of its bytes (for the bytes-in-flight budget)."""

    __slots__ = ("message", "size")

    def __init__(self, message: Any, size: int) -> None:
        self.message = message
        self.size = size


class AdmissionInterceptor(HandlerInterceptor):
    """Decoding, load shedding and field limits for every call (see the module docstring)."""

    def __init__(self, settings: Settings, recorder: Recorder) -> None:
        super().__init__()
        self.settings = settings
        self.recorder = recorder
        self.running = 0
        """Unary calls being worked on now."""
        self.streams = 0
        """Streaming calls open now."""
        self.inflight_bytes = 0
        """Request bytes of the unary calls admitted (running or queued) and of the stream
        items held (:meth:`take_bytes`)."""
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def call_limit(self) -> int:
        """Calls of every kind the server accepts at once: running, queued and streams. grpc
        enforces it as a call arrives (``maximum_concurrent_rpcs``), so a flood is refused
        before its calls wait on the event loop, where this interceptor cannot see them yet."""
        s = self.settings
        return s.max_concurrent_rpcs + s.max_queued_rpcs + s.max_concurrent_streams

    @property
    def core_options(self) -> list[tuple[str, int]]:
        """grpc core's bounds on the calls it holds before the server's event loop takes them
        up (when the loop is stalled, that is where calls wait).

        - ``grpc.server_max_unrequested_time_in_server``: a call held longer than
          ``UNREQUESTED_CALL_TIMEOUT_SECONDS`` is cancelled by the core, and its caller sees
          CANCELLED (the core cancels it; no status or ErrorInfo can be chosen). It was 1 s:
          a loop stalled for a second on a loaded machine turned the calls that arrived
          meanwhile into CANCELLED. Age is no load signal: once the loop runs again the held
          calls are refused at once with RESOURCE_EXHAUSTED beyond :attr:`call_limit` (grpc's
          own cap) or OVERLOADED beyond the queue (:meth:`_acquire`), and answered otherwise,
          so the bound only stands far beyond any sane deadline.
        - ``grpc.server.max_pending_requests`` (soft) and ``..._hard_limit``: grpc core's
          random early refusal (RESOURCE_EXHAUSTED "Too many pending requests") of calls held
          beyond them. grpc applies it only on its promise-based server path; on the
          filter-stack path the Python server uses (grpc 1.76) no call is refused by it (200
          calls held with a hard limit of 6: none refused), so :attr:`call_limit` and the
          admission queue are what bound a flood. Kept for when grpc's path changes.
        """
        return [
            ("grpc.server.max_pending_requests", max(1, self.settings.max_queued_rpcs)),
            ("grpc.server.max_pending_requests_hard_limit", self.call_limit),
            (
                "grpc.server_max_unrequested_time_in_server",
                self.settings.unrequested_call_timeout_seconds,
            ),
        ]

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        de = handler.request_deserializer
        if de is None:  # a generic handler taking raw bytes: nothing to decode
            return handler
        queued = method not in UNQUEUED

        def unary(behavior: Any) -> Any:
            async def admitted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, Undecodable):
                    self.recorder.event("undecodable")
                    raise refusal(request)
                message, size = request.message, request.size
                if not queued:
                    return await behavior(message, context)
                check_request(message, self.settings)
                await self.acquire(size, context)
                try:
                    return await behavior(message, context)
                finally:
                    self.release(size)

            return admitted

        def streaming(behavior: Any) -> Any:
            async def admitted(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                if isinstance(request, Undecodable):
                    self.recorder.event("undecodable")
                    raise refusal(request)
                self._open_stream()
                try:
                    async for response in behavior(self._unwrap(request), context):
                        yield response
                finally:
                    self.streams -= 1

            return admitted

        def coroutine(behavior: Any) -> Any:
            if handler.unary_unary is not None:
                return unary(behavior)

            async def admitted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, Undecodable):
                    self.recorder.event("undecodable")
                    raise refusal(request)
                self._open_stream()
                try:
                    return await behavior(self._unwrap(request), context)
                finally:
                    self.streams -= 1

            return admitted

        return self.tolerant_handler(wrap_behaviors(handler, coroutine, streaming), de)

    def tolerant_handler(
        self, handler: grpc.RpcMethodHandler, deserializer: Callable[[bytes], Any]
    ) -> grpc.RpcMethodHandler:
        """``handler`` reading its requests with ``deserializer`` made tolerant: each request
        arrives as :class:`Sized` (the message and its size) or
        :class:`~xylen_server.decoding.Undecodable`, never as an exception."""
        return _with_deserializer(handler, tolerant(deserializer, Sized))

    # -- streams --------------------------------------------------------------------------------

    def _open_stream(self) -> None:
        limit = self.settings.max_concurrent_streams
        if self.streams >= limit:
            self.recorder.event("shed")
            raise ResourceExhausted(
                f"{self.streams} streams are open, the limit (MAX_CONCURRENT_STREAMS) is {limit}; "
                "retry later",
                reason="TOO_MANY_STREAMS",
                limit=limit,
            )
        self.streams += 1

    def _unwrap(self, request: Any) -> Any:
        """A unary request's message, or a request stream yielding decoded messages."""
        if isinstance(request, Sized):
            check_request(request.message, self.settings)
            return request.message
        return self._messages(request)

    async def _messages(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for item in requests:
            if isinstance(item, Undecodable):
                self.recorder.event("undecodable")
                raise refusal(item)
            yield item.message

    # -- bytes of stream items -----------------------------------------------------------------

    def take_bytes(self, size: int) -> None:
        """Charge one stream item's ``size`` to the bytes-in-flight budget (give it back with
        :meth:`give_bytes` once its answer is written), or RESOURCE_EXHAUSTED BYTES_IN_FLIGHT."""
        limit = self.settings.max_inflight_bytes
        if self.inflight_bytes and self.inflight_bytes + size > limit:
            self.recorder.event("shed")
            raise ResourceExhausted(
                f"{self.inflight_bytes} request bytes are in flight; {size} more would pass "
                f"MAX_INFLIGHT_BYTES ({limit}); retry later",
                reason="BYTES_IN_FLIGHT",
                limit=limit,
            )
        self.inflight_bytes += size

    def give_bytes(self, size: int) -> None:
        self.inflight_bytes -= size

    # -- unary admission ------------------------------------------------------------------------

    async def acquire(self, size: int, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """A running slot for one call and its ``size`` bytes, or an error at once."""
        if not self.admit(size, context):
            await self.wait(size, context)

    def admit(self, size: int, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        """:meth:`acquire` without a coroutine for the common case: True when the call has its
        slot now, False when it must :meth:`wait` for one (the queue has room), or the error
        at once."""
        settings = self.settings
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            self.recorder.event("expired")
            raise DeadlineExceeded(
                "the call's deadline passed before it was read; it was not worked on",
                reason="DEADLINE_PASSED_IN_QUEUE",
            )
        if context.cancelled():
            self.recorder.event("cancelled")
            raise asyncio.CancelledError
        if self.inflight_bytes and self.inflight_bytes + size > settings.max_inflight_bytes:
            self.recorder.event("shed")
            raise ResourceExhausted(
                f"{self.inflight_bytes} request bytes are in flight; {size} more would pass "
                f"MAX_INFLIGHT_BYTES ({settings.max_inflight_bytes}); retry later",
                reason="BYTES_IN_FLIGHT",
                limit=settings.max_inflight_bytes,
            )
        if self.running < settings.max_concurrent_rpcs and not self._waiting:
            self.running += 1
            self.inflight_bytes += size
            return True
        if len(self._waiting) >= settings.max_queued_rpcs:
            self.recorder.event("shed")
            raise ResourceExhausted(
                f"the server is at its limit of {settings.max_concurrent_rpcs} calls running "
                f"(MAX_CONCURRENT_RPCS) and {settings.max_queued_rpcs} waiting "
                "(MAX_QUEUED_RPCS); retry later",
                reason="OVERLOADED",
                limit=settings.max_concurrent_rpcs + settings.max_queued_rpcs,
            )
        return False

    async def wait(self, size: int, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Wait in the queue for a slot (after :meth:`admit` said False), first come first
        served, until the call's deadline."""
        remaining = context.time_remaining()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self.inflight_bytes += size
        try:
            await asyncio.wait_for(waiter, remaining)
        except BaseException as exc:
            self.inflight_bytes -= size
            if waiter.done() and not waiter.cancelled():
                self.release(0)  # the slot was handed over just now: pass it on
            else:
                waiter.cancel()
                # wait_for cancels the waiter and returns a loop turn later: a release() in
                # that turn already took the cancelled waiter off the queue (and passed the
                # slot on). Removing it again raised ValueError, and the call got INTERNAL
                # instead of DEADLINE_EXCEEDED.
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
            if isinstance(exc, TimeoutError):
                self.recorder.event("expired")
                raise DeadlineExceeded(
                    "the call's deadline passed while it waited for a slot; it was not worked on",
                    reason="DEADLINE_PASSED_IN_QUEUE",
                ) from None
            if isinstance(exc, asyncio.CancelledError):
                self.recorder.event("cancelled")
            raise
        if context.cancelled():
            self.recorder.event("cancelled")
            self.release(size)
            raise asyncio.CancelledError

    def release(self, size: int) -> None:
        """Give the slot to the longest waiting call, or free it."""
        self.inflight_bytes -= size
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1


def _with_deserializer(
    handler: grpc.RpcMethodHandler, deserializer: Callable[[bytes], Any]
) -> grpc.RpcMethodHandler:
    ser = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(handler.unary_unary, deserializer, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(handler.stream_unary, deserializer, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(handler.unary_stream, deserializer, ser)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(handler.stream_stream, deserializer, ser)
