"""The composition root: the one place that builds a model server from its settings, and the one
way it starts and stops (``serve()`` and the tests alike).

:func:`build_server` wires predictor, feedback loop, model manager and retrainer into the
servicer, adds health, reflection and the interceptors (errors to status, metrics) and binds the
port (returning the one it got, so tests can ask for port 0). :meth:`Running.load` loads the
model while health says NOT_SERVING, then serves it; :meth:`Running.stop` flips health back,
drains the calls in flight, closes the feedback store and prediction log. :func:`start` does all
of that for an in-process server; :func:`serve` runs the process: SIGTERM stops it (exit 0), a
model that cannot load exits 2, and SIGHUP re-reads the model directory and hot-swaps to it when
it changed (as the ReloadModel RPC does).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.api.admission import AdmissionInterceptor
from xylen_server.api.interceptors import CallInterceptor
from xylen_server.api.metrics import Recorder
from xylen_server.api.servicer import ModelServicer
from xylen_server.api.telemetry import ServerTelemetry
from xylen_server.auth import AuthInterceptor, ServerSecurity, check_exposure
from xylen_server.errors import ModelLoadError, SettingsError
from xylen_server.health import Health, bind, server_options
from xylen_server.learning.feedback import FeedbackLoop
from xylen_server.learning.retrainer import Retrainer
from xylen_server.memory import trim_periodically
from xylen_server.serving.model_store import LoadedModel, load_model
from xylen_server.serving.predictor import Predictor, Result
from xylen_server.settings import Settings
from xylen_server.telemetry import MetricsHttp, server_tracing_interceptor, tracing_enabled
from xylen_server.tls import server_credentials
from xylen_server.versions.swap import ModelManager

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelService"].full_name


@dataclass
class Running:
    """A built server and the parts a caller needs to drive it."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    predictor: Predictor
    health: Health
    recorder: Recorder
    feedback: FeedbackLoop
    models: ModelManager
    retrainer: Retrainer
    admission: AdmissionInterceptor | None = None
    telemetry: ServerTelemetry | None = None
    """The metrics (None with METRICS_ENABLED=false)."""
    metrics_http: MetricsHttp | None = None
    """``/metrics`` and ``/health`` on :attr:`metrics_port`."""
    metrics_port: int = 0
    trimming: asyncio.Task[None] | None = field(default=None, repr=False)
    """Gives freed memory back to the system every ``MEMORY_TRIM_INTERVAL_SECONDS``."""

    async def load(self) -> LoadedModel:
        """Load, check and warm the model (off the loop), serve it, start the learning loop
        and report SERVING. Raises ModelLoadError (health stays NOT_SERVING)."""
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(None, load_model, self.settings)
        self.predictor.install(model)
        await loop.run_in_executor(None, self.models.keep_serving_version)
        await self.retrainer.start_up(model)
        await self.health.set(True)
        self.trimming = asyncio.ensure_future(
            trim_periodically(self.settings.memory_trim_interval_seconds)
        )
        logger.info("SERVING %s v%d on port %d", model.meta.name, model.meta.version, self.port)
        return model

    async def stop(self, grace_seconds: float) -> None:
        """NOT_SERVING, let calls in flight finish for ``grace_seconds``, cancel a running
        retrain, flush the prediction log, close the feedback store and the model."""
        await self.health.set(False)
        if self.trimming is not None:
            self.trimming.cancel()
        await self.server.stop(grace_seconds)
        if self.metrics_http is not None:
            await self.metrics_http.stop()
        await self.retrainer.close()
        await asyncio.get_running_loop().run_in_executor(None, self.feedback.close)
        if self.predictor.ready:
            self.predictor.model.close()


async def build_server(
    settings: Settings,
    credentials: grpc.ServerCredentials | None = None,
    recorder: Recorder | None = None,
) -> Running:
    """Build (not start) a server on ``settings.host:settings.grpc_port``, NOT_SERVING.

    TLS comes from ``TLS_CERT_FILE``/``TLS_KEY_FILE`` (mutual with ``TLS_CLIENT_CA_FILE``)
    unless ``credentials`` are passed in; neither serves plaintext. Credentials for the calls
    are checked by :class:`~xylen_server.auth.AuthInterceptor`. Raises SettingsError (before
    anything is bound) for unusable TLS or token files and for admin RPCs that would be open on
    a non-loopback address.
    """
    security = ServerSecurity.from_settings(settings)
    check_exposure(security, settings.host)
    if credentials is None:
        credentials = server_credentials(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        )
    recorder = recorder or Recorder()
    admission = AdmissionInterceptor(settings, recorder)
    # Outermost first: (spans,) metrics count every answer, errors become status + ErrorInfo,
    # credentials are checked, and admission (decoding, shedding, limits) runs before any
    # handler.
    interceptors: list[grpc.aio.ServerInterceptor] = [
        CallInterceptor(recorder, AuthInterceptor(security), admission)
    ]
    if tracing_enabled() and settings.trace_hooks:
        interceptors.insert(0, server_tracing_interceptor())
    server = grpc.aio.server(
        interceptors=interceptors,
        options=server_options(settings.max_message_bytes) + admission.core_options,
        # grpc's own cap, counted when a call arrives (before its task waits for the loop):
        # above it a call is refused RESOURCE_EXHAUSTED at once, without ErrorInfo.
        maximum_concurrent_rpcs=admission.call_limit,
    )
    predictor = Predictor(settings)
    predictor.on_dropped = recorder.event
    feedback = FeedbackLoop(settings)
    predictor.on_answer = feedback.record
    models = ModelManager(settings, predictor)
    retrainer = Retrainer(settings, feedback, models)
    pb_grpc.add_ModelServiceServicer_to_server(
        ModelServicer(predictor, feedback, models, retrainer, admission), server
    )
    health = Health(server, (SERVICE_NAME,))
    port = bind(server, f"{settings.host}:{settings.grpc_port}", credentials)
    running = Running(
        settings, server, port, predictor, health, recorder, feedback, models, retrainer, admission
    )
    if settings.metrics_enabled:
        telemetry = ServerTelemetry(
            settings, recorder, predictor, feedback, models, retrainer, lambda: health.serving
        )
        record, answered = feedback.record, telemetry.answered

        def on_answer(result: Result) -> None:
            record(result)
            answered(result)

        predictor.on_answer = on_answer
        running.telemetry = telemetry
        running.metrics_http = MetricsHttp(telemetry.meters, telemetry.health)
        running.metrics_port = await running.metrics_http.start(
            settings.host, settings.metrics_port
        )
    await health.set(False)
    return running


async def start(settings: Settings, credentials: grpc.ServerCredentials | None = None) -> Running:
    """Build, start and load: a SERVING server (in this process, on this event loop)."""
    running = await build_server(settings, credentials)
    await running.server.start()
    try:
        await running.load()
    except BaseException:
        await running.stop(0)
        raise
    return running


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    try:
        running = await build_server(settings)
    except SettingsError as exc:
        print(f"xylen-server: error: {exc}", file=sys.stderr, flush=True)
        return 2
    await running.server.start()
    logger.info(
        "listening on %s:%d (NOT_SERVING until the model is ready)", settings.host, running.port
    )
    print(f"xylen-server listening on port {running.port}", flush=True)
    if running.metrics_http is not None:
        print(f"xylen-server metrics on port {running.metrics_port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    loading = asyncio.ensure_future(running.load())
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait(
        [cast(asyncio.Future[Any], loading), stopping], return_when=asyncio.FIRST_COMPLETED
    )
    if loading not in done:
        logger.info("stopped while loading the model")
        loading.cancel()
        await running.server.stop(0)
        return 0
    try:
        loading.result()
    except ModelLoadError as exc:
        print(f"xylen-server: error: {exc}", file=sys.stderr, flush=True)
        await running.server.stop(0)
        return 2

    reloads: set[asyncio.Task[Any]] = set()

    def reload() -> None:
        task = loop.create_task(_reload(running))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    logger.info(
        "shutting down: NOT_SERVING, draining for up to %.1fs", settings.shutdown_grace_seconds
    )
    await running.stop(settings.shutdown_grace_seconds)
    logger.info("stopped cleanly")
    return 0


async def _reload(running: Running) -> None:
    """SIGHUP: swap to the model directory's model if it changed; a bad one is logged, kept out."""
    try:
        model, changed = await running.models.reload()
    except ModelLoadError:
        return  # logged where it was refused
    except Exception as exc:
        logger.error("reload refused, the served model stays: %s", exc)
        return
    if not changed:
        logger.info("reload: the model directory still holds v%d", model.meta.version)
