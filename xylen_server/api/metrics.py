"""The one place that records measurements of the RPCs: every call by method, final status code
and ErrorInfo reason with its duration, the calls and streams in flight, and refused (shed)
calls. The counts are kept here for the tests; with :class:`RpcInstruments` attached the same
calls also go to OpenTelemetry (and from there to ``/metrics``) without touching the call sites.

Names follow the OpenTelemetry RPC semantic conventions where they exist
(``rpc.server.duration``, ``rpc.system``, ``rpc.service``, ``rpc.method``,
``rpc.grpc.status_code``; the code is its name, e.g. ``INVALID_ARGUMENT``, so alert rules and
dashboards read it without a table) and Prometheus naming once exported
(``rpc_server_duration_seconds``, ``rpc_server_requests_total``).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from opentelemetry.metrics import Meter


def split_method(method: str) -> tuple[str, str]:
    """``/xylen.v1.ModelService/Predict`` -> (``xylen.v1.ModelService``, ``Predict``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class RpcInstruments:
    """The OpenTelemetry instruments of the RPCs of one server."""

    def __init__(self, meter: Meter, model: str = "") -> None:
        self.model = model
        self.duration = meter.create_histogram(
            "rpc.server.duration",
            unit="s",
            description="Time from the call's arrival to its final status, by RPC and status.",
        )
        self.requests = meter.create_counter(
            "rpc.server.requests", description="Calls answered, by RPC and status code."
        )
        self.errors = meter.create_counter(
            "xylen.rpc.errors",
            description="Calls answered with an error, by RPC, status code and ErrorInfo reason.",
        )
        self.active = meter.create_up_down_counter(
            "rpc.server.active_requests", description="Calls in flight (unary and streaming)."
        )
        self.streams = meter.create_up_down_counter(
            "xylen.rpc.open_streams", description="Streaming calls open now."
        )
        self.sheds = meter.create_counter(
            "xylen.rpc.sheds",
            description="Calls refused before their handler ran, by RPC and reason.",
        )
        self._attributes: dict[str, dict[str, str]] = {}

    def attributes(self, method: str) -> dict[str, str]:
        found = self._attributes.get(method)
        if found is None:
            service, name = split_method(method)
            found = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
            if self.model:
                found["model"] = self.model
            self._attributes[method] = found
        return found


@dataclass
class Recorder:
    """Counts RPCs by method and status code (and feeds :class:`RpcInstruments` when set)."""

    instruments: RpcInstruments | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    _reasons: Counter[tuple[str, str]] = field(default_factory=Counter)
    _sheds: Counter[tuple[str, str]] = field(default_factory=Counter)

    def started(self, method: str, streaming: bool) -> None:
        """A call arrived (and, ``streaming``, opened a stream)."""
        instruments = self.instruments
        if instruments is not None:
            attributes = instruments.attributes(method)
            instruments.active.add(1, attributes)
            if streaming:
                instruments.streams.add(1, attributes)

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
                self._reasons[(method, reason or code)] += 1
        instruments = self.instruments
        if instruments is None:
            return
        attributes = instruments.attributes(method)
        if seconds is not None:
            instruments.active.add(-1, attributes)
            if streaming:
                instruments.streams.add(-1, attributes)
        with_code = {**attributes, "rpc.grpc.status_code": code}
        instruments.requests.add(1, with_code)
        if seconds is not None:
            instruments.duration.record(seconds, with_code)
        if code != "OK":
            instruments.errors.add(1, {**with_code, "reason": reason or code})

    def shed(self, method: str, reason: str) -> None:
        """A call refused before its handler ran (admission control, an undecodable message).
        The hook for the server's load shedding: whatever refuses a call calls this."""
        with self._lock:
            self._sheds[(method, reason)] += 1
        instruments = self.instruments
        if instruments is not None:
            instruments.sheds.add(1, {**instruments.attributes(method), "reason": reason})

    def calls(self, method: str, code: str | None = None) -> int:
        with self._lock:
            return sum(n for (m, c), n in self._calls.items() if m == method and code in (None, c))

    def errors(self, method: str, reason: str) -> int:
        """Calls of ``method`` that ended with ErrorInfo ``reason``."""
        with self._lock:
            return self._reasons[(method, reason)]

    def sheds(self, method: str, reason: str | None = None) -> int:
        with self._lock:
            return sum(
                n for (m, r), n in self._sheds.items() if m == method and reason in (None, r)
            )
