"""What both servers (model server and coordinator) share to be observed: OpenTelemetry metrics
exposed in the Prometheus text format, the small HTTP server that answers ``/metrics`` and
``/health``, the process's own series, and tracing configured by the standard ``OTEL_*``
variables.

Metrics. Each server owns one :class:`Meters`: an OpenTelemetry ``MeterProvider`` whose only
reader is the SDK's ``PrometheusMetricReader`` on a registry of its own (so several servers in one
process, as in the tests, never share series). Instruments are created from ``Meters.meter``;
Prometheus names follow from the OpenTelemetry names and units (``rpc.server.duration`` in
``s`` becomes ``rpc_server_duration_seconds``, a counter gets ``_total``). Every histogram of
seconds uses :data:`LATENCY_BUCKETS` (100 us to 1 s, 1-2.5-5 steps).

HTTP. :class:`MetricsHttp` is an asyncio server on the event loop with two routes, ``GET
/metrics`` and ``GET /health`` (JSON); anything else is 404, anything but GET/HEAD 405. It binds
the server's host (loopback by default) on ``METRICS_PORT`` (0: a free port).

Traces. Off unless ``OTEL_TRACES_EXPORTER`` names an exporter or
``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (then OTLP).
``console`` prints spans for debugging. :func:`tracing_enabled` is the one flag the hot paths
test before they open a span, so tracing off costs a global read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from opentelemetry import propagate, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from xylen_server.errors import SettingsError

logger = logging.getLogger(__name__)

#: Bucket bounds (seconds) of every latency histogram: 100 us .. 1 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


#: Bucket bounds of the ensemble's disagreement (a weighted standard deviation, 0 .. 0.5).
SPREAD_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


class Meters:
    """One server's meter provider, its Prometheus registry and the process's own series."""

    def __init__(self, service_name: str, attributes: Mapping[str, str] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reader = PrometheusMetricReader(
            disable_target_info=True, scope_info_enabled=False, registry=self.registry
        )
        resource_ = Resource.create({"service.name": service_name, **(attributes or {})})
        self.provider = MeterProvider(
            metric_readers=[self.reader],
            resource=resource_,
            views=[
                View(
                    instrument_type=Histogram,
                    instrument_unit="s",
                    aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS),
                ),
                View(
                    instrument_name="*disagreement",
                    aggregation=ExplicitBucketHistogramAggregation(SPREAD_BUCKETS),
                ),
            ],
        )
        self.meter: Meter = self.provider.get_meter(service_name)
        self._process_series()

    def _process_series(self) -> None:
        meter = self.meter
        meter.create_observable_gauge(
            "process.memory.rss",
            [_observe(_rss_bytes)],
            unit="By",
            description="Resident set size of the process.",
        )
        meter.create_observable_gauge(
            "process.memory.limit",
            [_observe(memory_limit_bytes)],
            unit="By",
            description="Memory the process may use: its cgroup limit, else the machine's RAM.",
        )
        meter.create_observable_counter(
            "process.cpu.time",
            [_cpu_seconds],
            unit="s",
            description="CPU time of the process, user and system.",
        )
        started = time.time()
        meter.create_observable_gauge(
            "process.start.time",
            [_observe(lambda: started)],
            unit="s",
            description="When the process started (Unix seconds).",
        )

    def render(self) -> bytes:
        """The current series in the Prometheus text format (collects every instrument)."""
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _observe(
    read: Callable[[], float | None],
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        value = read()
        return [] if value is None else [Observation(value)]

    return callback


def _rss_bytes() -> float | None:
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return float(pages * os.sysconf("SC_PAGE_SIZE"))


def memory_limit_bytes() -> float | None:
    """The cgroup memory limit (v2 ``memory.max`` or v1), else the machine's physical memory."""
    for path in (
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            return float(raw)
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError):
        return None


def _cpu_seconds(_options: CallbackOptions) -> Iterable[Observation]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return [
        Observation(usage.ru_utime, {"cpu.mode": "user"}),
        Observation(usage.ru_stime, {"cpu.mode": "system"}),
    ]


# -- the HTTP endpoint ---------------------------------------------------------------------

#: Longest request head the endpoint reads; a longer one is answered 431 and closed.
_MAX_HEAD_BYTES = 8192


@dataclass(frozen=True)
class Page:
    """One answer of the metrics endpoint."""

    status: int
    content_type: str
    body: bytes


def json_page(payload: Mapping[str, Any], status: int = 200) -> Page:
    return Page(status, "application/json", (json.dumps(payload, sort_keys=True) + "\n").encode())


_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Renders(Protocol):
    """What ``/metrics`` shows: :class:`Meters`, or a supervisor's merge of its workers'."""

    def render(self) -> bytes: ...


class MetricsHttp:
    """``GET /metrics`` (Prometheus text) and ``GET /health`` (JSON) on the event loop.

    ``health`` returns the JSON body and whether the server is serving (200, else 503).
    ``/metrics`` is rendered on a worker thread so a scrape never holds the loop.
    """

    def __init__(
        self,
        meters: Renders,
        health: Callable[[], tuple[Mapping[str, Any], bool]],
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.meters = meters
        self.health = health
        self.refresh = refresh
        """Awaited on the loop before ``/metrics`` and ``/health`` are answered."""
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); returns the bound port. Raises
        SettingsError naming the port when it cannot be bound."""
        bind_host = host.strip("[]")
        try:
            self._server = await asyncio.start_server(
                self._serve, bind_host, port, limit=_MAX_HEAD_BYTES
            )
        except OSError as exc:
            raise SettingsError(
                f"METRICS_PORT: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def start_unix(self, path: Path) -> None:
        """Listen on the unix socket ``path`` instead (a worker's endpoint, scraped by its
        supervisor: xylen_server.workers)."""
        path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(
            self._serve, str(path), limit=_MAX_HEAD_BYTES
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _page(self, method: str, path: str) -> Page:
        if method not in ("GET", "HEAD"):
            return Page(405, "text/plain", b"only GET\n")
        path = path.split("?", 1)[0]
        if path in ("/metrics", "/health") and self.refresh is not None:
            await self.refresh()
        if path == "/metrics":
            body = await asyncio.get_running_loop().run_in_executor(None, self.meters.render)
            return Page(200, CONTENT_TYPE_LATEST, body)
        if path == "/health":
            payload, serving = self.health()
            return json_page(payload, 200 if serving else 503)
        return Page(404, "text/plain", b"not found: try /metrics or /health\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            except asyncio.LimitOverrunError:
                page = Page(431, "text/plain", b"request head too large\n")
                method = "GET"
            else:
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = request_line.split(" ")
                method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
                try:
                    page = await self._page(method, path)
                except Exception:
                    logger.exception("metrics endpoint failed on %s", path[:100])
                    page = Page(500, "text/plain", b"internal error; see the server log\n")
            reason = _REASONS.get(page.status, "")
            header = (
                f"HTTP/1.1 {page.status} {reason}\r\nContent-Type: {page.content_type}\r\n"
                f"Content-Length: {len(page.body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(header if method == "HEAD" else header + page.body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


# -- traces ------------------------------------------------------------------------------

_provider: Any = None


def tracing_enabled() -> bool:
    """True once :func:`configure_tracing` (or a test) installed a tracer provider."""
    return _provider is not None


def tracer_provider() -> Any:
    """The installed tracer provider, or None when tracing is off."""
    return _provider


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name, tracer_provider=_provider)


def traces_exporter_from_env(environ: Mapping[str, str]) -> str:
    """``none``, ``console`` or ``otlp`` from the standard variables (see the module doc)."""
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "none"
    if named:
        if named not in ("none", "console", "otlp"):
            raise SettingsError(
                f"OTEL_TRACES_EXPORTER: expected otlp, console or none, got {named[:40]!r}"
            )
        return named
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        return "otlp"
    return "none"


def configure_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install a tracer provider for this process as the ``OTEL_*`` variables say; returns
    whether tracing is on. Raises SettingsError for an exporter that is not available."""
    environ = os.environ if environ is None else environ
    kind = traces_exporter_from_env(environ)
    if kind == "none":
        return False
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider(
        resource=Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", service_name)})
    )
    if kind == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # An unreachable collector must not hold up SIGTERM: each export (and the flush at
        # exit) gives up after OTEL_EXPORTER_OTLP_TIMEOUT, 2 s unless set.
        timeout = None
        if not (
            environ.get("OTEL_EXPORTER_OTLP_TIMEOUT")
            or environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
        ):
            timeout = 2.0
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(timeout=timeout), export_timeout_millis=2000)
        )
    install_tracer_provider(provider)
    return True


def server_tracing_interceptor() -> Any:
    """The contrib gRPC server interceptor (a SERVER span per call, the caller's context taken
    from the metadata) for the xylen services. grpc.health.v1 and reflection are left out: they
    are probes, and Watch writes with ``context.write``, a shape the interceptor cannot wrap."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return aio_server_interceptor(
        tracer_provider=_provider, filter_=filters.negate(filters.service_prefix("grpc."))
    )


def inject_context(context: Any = None) -> dict[str, str]:
    """The trace context (default: the current one) as W3C headers (``traceparent``...), to
    send along."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def extract_context(carrier: Mapping[str, str]) -> Any:
    """The trace context a caller sent with :func:`inject_context` (empty: the current one)."""
    return propagate.extract(dict(carrier))


def install_tracer_provider(provider: Any) -> None:
    """Make ``provider`` the one the servers built from now on trace to (None: tracing off).
    Tests pass one with an in-memory exporter; it is not made the global provider, so turning
    it off again leaves nothing behind."""
    global _provider
    _provider = provider
