"""The one place that records measurements of the RPCs: every call by method, final status code
and ErrorInfo reason with its duration, the calls and streams in flight, and admission's events
(undecodable bytes, sheds, expired or cancelled work). The counts are kept here (the tests read
them; :class:`RpcInstruments` exports them at scrape time); with :class:`RpcInstruments`
attached each call's duration also goes to an OpenTelemetry histogram, and from there to
``/metrics``, without touching the call sites.

Names follow the OpenTelemetry RPC semantic conventions where they exist
(``rpc.server.duration``, ``rpc.system``, ``rpc.service``, ``rpc.method``,
``rpc.grpc.status_code``; the code is its name, e.g. ``INVALID_ARGUMENT``, so alert rules and
dashboards read it without a table) and Prometheus naming once exported
(``rpc_server_duration_seconds``, ``rpc_server_requests_total``).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation


def split_method(method: str) -> tuple[str, str]:
    """``/xylen.v1.ModelService/Predict`` -> (``xylen.v1.ModelService``, ``Predict``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class RpcInstruments:
    """The OpenTelemetry instruments of the RPCs of one server.

    Only the latency histogram is recorded per call (one SDK call costs several microseconds);
    the counts (calls, errors, sheds, in flight, open streams) are the :class:`Recorder`'s own
    and are read by observable instruments when ``/metrics`` is scraped."""

    def __init__(self, meter: Meter, recorder: Recorder, model: str = "") -> None:
        self.model = model
        self.recorder = recorder
        self.duration = meter.create_histogram(
            "rpc.server.duration",
            unit="s",
            description="Time from the call's arrival to its final status, by RPC and status.",
        )
        meter.create_observable_counter(
            "rpc.server.requests",
            [self._requests],
            description="Calls answered, by RPC and status code.",
        )
        meter.create_observable_counter(
            "xylen.rpc.errors",
            [self._errors],
            description="Calls answered with an error, by RPC, status code and ErrorInfo reason.",
        )
        meter.create_observable_up_down_counter(
            "rpc.server.active_requests",
            [self._active],
            description="Calls in flight (unary and streaming).",
        )
        meter.create_observable_up_down_counter(
            "xylen.rpc.open_streams", [self._streams], description="Streaming calls open now."
        )
        meter.create_observable_counter(
            "xylen.rpc.sheds",
            [self._sheds],
            description="Calls shed at admission (too many in flight or queued).",
        )
        meter.create_observable_counter(
            "xylen.rpc.events",
            [self._events],
            description="Admission events: undecodable requests, sheds, work dropped unrun "
            "because its deadline passed (expired) or its call was cancelled.",
        )
        self._attributes: dict[tuple[str, str], dict[str, str]] = {}

    def attributes(self, method: str, code: str = "") -> dict[str, str]:
        """The attributes of ``method`` (and status ``code``), built once and kept."""
        key = (method, code)
        found = self._attributes.get(key)
        if found is None:
            service, name = split_method(method)
            found = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
            if self.model:
                found["model"] = self.model
            if code:
                found["rpc.grpc.status_code"] = code
            self._attributes[key] = found
        return found

    def _requests(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, self.attributes(method, code))
            for (method, code), n in self.recorder.snapshot(self.recorder._calls).items()
        ]

    def _errors(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {**self.attributes(method, code), "reason": reason})
            for (method, code, reason), n in self.recorder.snapshot(self.recorder._reasons).items()
        ]

    def _active(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, self.attributes(method))
            for method, n in self.recorder.snapshot(self.recorder._active).items()
        ]

    def _streams(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, self.attributes(method))
            for method, n in self.recorder.snapshot(self.recorder._streams).items()
        ]

    def _sheds(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.recorder.events("shed"))]

    def _events(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {"event": name})
            for name, n in self.recorder.snapshot(self.recorder._events).items()
        ]


@dataclass
class Recorder:
    """Counts RPCs by method, status code and reason, the calls and streams in flight, and
    named events (see :meth:`event`); times them into :class:`RpcInstruments` when set."""

    instruments: RpcInstruments | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    _reasons: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    _active: Counter[str] = field(default_factory=Counter)
    _streams: Counter[str] = field(default_factory=Counter)
    _events: Counter[str] = field(default_factory=Counter)

    def event(self, name: str) -> None:
        """Count one event of ``name``: ``undecodable`` request bytes, a call ``shed`` at
        admission, work dropped unrun because its deadline passed (``expired``) or its call
        was ``cancelled``."""
        with self._lock:
            self._events[name] += 1

    def events(self, name: str) -> int:
        with self._lock:
            return self._events[name]

    def started(self, method: str, streaming: bool) -> None:
        """A call arrived (and, ``streaming``, opened a stream)."""
        with self._lock:
            self._active[method] += 1
            if streaming:
                self._streams[method] += 1

    def rpc(
        self,
        method: str,
        code: str,
        seconds: float | None = None,
        reason: str = "",
        streaming: bool = False,
    ) -> None:
        """A call ended with ``code`` (and ErrorInfo ``reason``) after ``seconds``; when
        ``seconds`` is given the call was counted by :meth:`started` and is no longer in
        flight."""
        with self._lock:
            self._calls[(method, code)] += 1
            if code != "OK":
                self._reasons[(method, code, reason or code)] += 1
            if seconds is not None:
                self._active[method] -= 1
                if streaming:
                    self._streams[method] -= 1
        instruments = self.instruments
        if instruments is not None and seconds is not None:
            instruments.duration.record(seconds, instruments.attributes(method, code))

    def snapshot(self, counts: Counter[Any]) -> dict[Any, int]:
        """A copy of one of the counts, taken under the lock (for the observable instruments)."""
        with self._lock:
            return dict(counts)

    def calls(self, method: str, code: str | None = None) -> int:
        with self._lock:
            return sum(n for (m, c), n in self._calls.items() if m == method and code in (None, c))

    def errors(self, method: str, reason: str) -> int:
        """Calls of ``method`` that ended with ErrorInfo ``reason``."""
        with self._lock:
            return sum(n for (m, _, r), n in self._reasons.items() if m == method and r == reason)
