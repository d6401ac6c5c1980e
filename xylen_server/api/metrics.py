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

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily, Metric

from xylen_server.telemetry import LATENCY_BUCKETS


def split_method(method: str) -> tuple[str, str]:
    """``/xylen.v1.ModelService/Predict`` -> (``xylen.v1.ModelService``, ``Predict``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class RpcInstruments:
    """The instruments of the RPCs of one server.

    Nothing here goes through the OpenTelemetry SDK per call (one SDK histogram record costs
    ~9 us, a few percent of a Predict): the latency histogram is :class:`LatencyHistogram`,
    plain bucket counts kept by the :class:`Recorder` and exported to the Prometheus registry
    by a collector of its own, and the counts (calls, errors, sheds, in flight, open streams)
    are the :class:`Recorder`'s and are read by observable instruments when ``/metrics`` is
    scraped."""

    def __init__(
        self,
        meter: Meter,
        recorder: Recorder,
        model: str = "",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.model = model
        self.recorder = recorder
        self.duration = LatencyHistogram(self.attributes)
        recorder.durations = self.duration
        if registry is not None:
            registry.register(self.duration)
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


class LatencyHistogram:
    """``rpc.server.duration``: call durations by (method, status code) in the buckets of
    :data:`~xylen_server.telemetry.LATENCY_BUCKETS`, counted in plain lists (record under the
    :class:`Recorder`'s lock), exported as the Prometheus histogram
    ``rpc_server_duration_seconds`` with the OpenTelemetry RPC attributes as labels, exactly
    as the SDK's Prometheus reader would name it."""

    name = "rpc_server_duration"
    unit = "seconds"
    description = "Time from the call's arrival to its final status, by RPC and status."

    def __init__(
        self,
        attributes: Callable[[str, str], Mapping[str, str]],
        bounds: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self.attributes = attributes
        self.bounds = tuple(bounds)
        self._les = [f"{bound}" for bound in self.bounds] + ["+Inf"]
        self._series: dict[tuple[str, str], list[float]] = {}
        """(method, code) -> a count per bucket (the last one past every bound), then the sum."""
        self._lock = threading.Lock()

    def record(self, key: tuple[str, str], seconds: float) -> None:
        series = self._series.get(key)
        if series is None:
            with self._lock:
                series = self._series.setdefault(key, [0] * (len(self.bounds) + 2))
        series[bisect.bisect_left(self.bounds, seconds)] += 1
        series[-1] += seconds

    def snapshot(self) -> dict[tuple[str, str], list[float]]:
        with self._lock:
            return {key: list(series) for key, series in self._series.items()}

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.description, labels=[], unit=self.unit)]

    def collect(self) -> list[Metric]:
        """The histogram family for a Prometheus registry (called at scrape time)."""
        rows = []
        for (method, code), series in self.snapshot().items():
            labels = {
                key.replace(".", "_"): value for key, value in self.attributes(method, code).items()
            }
            rows.append((labels, series))
        keys = sorted({key for labels, _ in rows for key in labels})
        family = HistogramMetricFamily(self.name, self.description, labels=keys, unit=self.unit)
        for labels, series in rows:
            buckets, total = [], 0
            for le, count in zip(self._les, series[:-1], strict=True):
                total += int(count)
                buckets.append((le, total))
            family.add_metric([labels.get(key, "") for key in keys], buckets, series[-1])
        return [family]


@dataclass
class Recorder:
    """Counts RPCs by method, status code and reason, the calls and streams in flight, and
    named events (see :meth:`event`); times them into :class:`RpcInstruments` when set."""

    instruments: RpcInstruments | None = None
    durations: LatencyHistogram | None = None
    """Where each call's duration goes (set by :class:`RpcInstruments`; None: not timed)."""
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
        self.calls_ended([(method, code, seconds, reason)], streaming)

    def calls_ended(
        self, calls: list[tuple[str, str, float | None, str]], streaming: bool = False
    ) -> None:
        """:meth:`rpc` of each call (method, code, seconds, reason) in ``calls``, under one
        taking of the lock: the unary calls a busy loop answered in one turn come together."""
        durations = self.durations
        with self._lock:
            for method, code, seconds, reason in calls:
                key = (method, code)
                self._calls[key] += 1
                if code != "OK":
                    self._reasons[(method, code, reason or code)] += 1
                if seconds is not None:
                    self._active[method] -= 1
                    if streaming:
                        self._streams[method] -= 1
                    if durations is not None:
                        durations.record(key, seconds)

    def snapshot(self, counts: Counter[Any]) -> dict[Any, int]:
        """A copy of one of the counts, taken under the lock (for the observable instruments)."""
        with self._lock:
            return dict(counts)

    def in_flight(self) -> int:
        """Calls started and not yet ended (a call is counted as it ends on the server, which
        can be just after its caller has the answer)."""
        with self._lock:
            return sum(self._active.values())

    def calls(self, method: str, code: str | None = None) -> int:
        with self._lock:
            return sum(n for (m, c), n in self._calls.items() if m == method and code in (None, c))

    def errors(self, method: str, reason: str) -> int:
        """Calls of ``method`` that ended with ErrorInfo ``reason``."""
        with self._lock:
            return sum(n for (m, _, r), n in self._reasons.items() if m == method and r == reason)
