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

Workers (``WORKERS`` above 1, :mod:`xylen_server.workers`): a process started by the supervisor
(``WORKER_INDEX`` set) binds the shared port with ``SO_REUSEPORT``, reports SERVING only while
the supervisor says every worker is ready, serves its metrics on a unix socket, and runs a
second, internal gRPC server on ``WORKER_RUN_DIR/worker-<i>.sock``: the owner (worker 0) serves
the forwarded owner-only RPCs there (:data:`OWNER_METHODS`, the caller taken from
:data:`CALLER_KEY`, checked by the worker that took the call), and every worker answers
``xylen.internal.Worker/FindPrediction`` (a prediction from its in-memory log, for the owner's
Feedback join) and ``Follow`` (load the model directory if it changed: the owner asks after
every swap).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
from grpc_status import rpc_status

from training.metadata import MetadataError, ModelMetadata
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server import auth
from xylen_server.api import inference_v2
from xylen_server.api.admission import AdmissionInterceptor
from xylen_server.api.interceptors import CallInterceptor
from xylen_server.api.metrics import Recorder
from xylen_server.api.servicer import ModelServicer
from xylen_server.api.telemetry import ServerTelemetry
from xylen_server.auth import AuthInterceptor, ServerSecurity, check_exposure
from xylen_server.errors import (
    ErrorStatusInterceptor,
    HandlerInterceptor,
    InterceptedRegistration,
    ModelLoadError,
    SettingsError,
    Unavailable,
)
from xylen_server.health import Health, bind, server_options
from xylen_server.learning.feedback import FeedbackLoop
from xylen_server.learning.prediction_log import LoggedPrediction
from xylen_server.learning.retrainer import Retrainer
from xylen_server.memory import trim_periodically, use_arrow_pool
from xylen_server.serving.model_store import LoadedModel, load_model
from xylen_server.serving.predictor import Predictor, Result
from xylen_server.settings import Settings
from xylen_server.telemetry import MetricsHttp, server_tracing_interceptor, tracing_enabled
from xylen_server.tls import server_credentials
from xylen_server.versions.swap import ModelManager
from xylen_server.workers import READY

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
    registration: InterceptedRegistration | None = None
    """Where services are added to :attr:`server` with the call wrapper (metrics, errors,
    credentials, admission) around their handlers: add any service through it, never to
    :attr:`server` directly (which would serve it bare)."""
    internal: grpc.aio.Server | None = None
    """A worker's internal server on its unix socket (None: a server on its own)."""
    links: WorkerLinks | None = None
    """A worker's channels to the other workers."""
    following: asyncio.Task[None] | None = field(default=None, repr=False)
    """A worker other than the owner: checks the model directory every FOLLOW_SECONDS."""
    deferred_bind: tuple[str, grpc.ServerCredentials | None] | None = field(
        default=None, repr=False
    )
    """A worker's public address, bound by :meth:`open` once the model is loaded."""
    started: bool = False

    async def open(self) -> None:
        """Bind the public port if that was deferred, and start the server(s)."""
        if self.deferred_bind is not None:
            address, credentials = self.deferred_bind
            self.port = bind(self.server, address, credentials)
            self.deferred_bind = None
        await self.server.start()
        self.started = True
        if self.internal is not None:
            await self.internal.start()

    @property
    def owner(self) -> bool:
        """Whether this process owns the learning loop (a server on its own, or worker 0)."""
        return self.settings.worker_index <= 0

    async def load(self) -> LoadedModel:
        """Load, check and warm the model (off the loop), serve it, start the learning loop
        and report SERVING. Raises ModelLoadError (health stays NOT_SERVING)."""
        pool, at_import = use_arrow_pool(self.settings.arrow_memory_pool)
        logger.info("Arrow memory pool: %s (at pyarrow's import: %s)", pool, at_import)
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(None, load_model, self.settings)
        self.predictor.install(model)
        if self.owner:  # the others never open the feedback store or write the history
            await loop.run_in_executor(None, self.models.keep_serving_version)
            await self.retrainer.start_up(model)
        # What start-up built lives as long as the process: out of the collector's sight, a
        # full collection no longer walks it (6-8 ms of a 34 ms pause seen under load, on
        # whichever thread happened to allocate).
        gc.collect()
        gc.freeze()
        await self.health.set(True)
        if not self.owner:
            self.following = asyncio.ensure_future(_keep_following(self))
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
        if self.following is not None:
            self.following.cancel()
        await self.server.stop(grace_seconds)
        if self.internal is not None:  # after the others' forwarded calls had their grace
            await self.internal.stop(grace_seconds)
        if self.links is not None:
            await self.links.close()
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
    # CallInterceptor wraps every handler as it is registered (``registration``), not as a grpc
    # interceptor, which would cost a chain of coroutines per call; spans, when on, come from
    # grpc's interceptor around that.
    call = CallInterceptor(recorder, AuthInterceptor(security), admission)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tracing_enabled() and settings.trace_hooks:
        interceptors.append(server_tracing_interceptor())
    worker = settings.worker_index >= 0 and settings.worker_run_dir is not None
    server = grpc.aio.server(
        interceptors=interceptors or None,
        options=server_options(settings.max_message_bytes, reuse_port=worker)
        + admission.core_options,
        # grpc's own cap, counted when a call arrives (before its task waits for the loop):
        # above it a call is refused RESOURCE_EXHAUSTED at once, without ErrorInfo.
        maximum_concurrent_rpcs=admission.call_limit,
    )
    predictor = Predictor(settings)
    predictor.on_dropped = recorder.event
    feedback = FeedbackLoop(settings)
    predictor.on_answer = feedback.record
    predictor.after_the_answer = call.after_the_answer  # one callback a turn, with the metrics
    models = ModelManager(settings, predictor)
    retrainer = Retrainer(settings, feedback, models)
    servicer = ModelServicer(predictor, feedback, models, retrainer, admission)
    links = WorkerLinks(settings) if worker else None
    if links is not None and settings.worker_index > 0:
        feedback.owns_store = False
        _forward_to_owner(servicer, links)
    registration = call.registrar(server)  # everything served is added through it
    pb_grpc.add_ModelServiceServicer_to_server(servicer, registration)
    health = Health(registration, (SERVICE_NAME, inference_v2.SERVICE_NAME), gated=worker)
    # The Open Inference Protocol (KServe v2) beside it: same port, predictor and interceptors.
    inference_v2.add_to_server(registration, predictor, lambda: health.serving)
    # An IPv6 literal (GRPC_HOST=::1) needs brackets in a gRPC address.
    bare = settings.host.strip("[]")
    host = f"[{bare}]" if ":" in bare else bare
    address = f"{host}:{settings.grpc_port}"
    # A worker joins the shared port only once its model is ready (Running.open): a socket in
    # the SO_REUSEPORT group takes its share of new connections from the moment it listens.
    port = settings.grpc_port if worker else bind(server, address, credentials)
    running = Running(
        settings, server, port, predictor, health, recorder, feedback, models, retrainer, admission
    )
    running.registration = registration
    if worker:
        running.deferred_bind = (address, credentials)
    if links is not None:
        running.links = links
        running.internal = _internal_server(running, servicer, links)
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
        if links is not None:  # scraped by the supervisor, which serves METRICS_PORT
            await running.metrics_http.start_unix(links.socket("metrics", settings.worker_index))
        else:
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
    # Handlers first: whoever read the port below may send SIGTERM at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if running.deferred_bind is None:
        await running.open()
        logger.info(
            "listening on %s:%d (NOT_SERVING until the model is ready)", settings.host, running.port
        )
        print(f"xylen-server listening on port {running.port}", flush=True)
        if running.metrics_http is not None:
            print(f"xylen-server metrics on port {running.metrics_port}", flush=True)
    supervisor: asyncio.Task[None] | None = None
    if running.links is not None:
        supervisor = asyncio.ensure_future(_obey_supervisor(running, stop))

    loading = asyncio.ensure_future(running.load())
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait(
        [cast(asyncio.Future[Any], loading), stopping], return_when=asyncio.FIRST_COMPLETED
    )
    if loading not in done:
        logger.info("stopped while loading the model")
        loading.cancel()
        if running.started:
            await running.server.stop(0)
        return 0
    try:
        loading.result()
    except ModelLoadError as exc:
        print(f"xylen-server: error: {exc}", file=sys.stderr, flush=True)
        if running.started:
            await running.server.stop(0)
        return 2

    if running.deferred_bind is not None:  # a worker: now it joins the port
        try:
            await running.open()
        except OSError as exc:
            print(f"xylen-server: error: {exc}", file=sys.stderr, flush=True)
            return 2
        logger.info(
            "worker %d listening on %s:%d", settings.worker_index, settings.host, running.port
        )
    if running.links is not None:
        print(READY, flush=True)
    reloads: set[asyncio.Task[Any]] = set()

    def reload() -> None:
        task = loop.create_task(_reload(running) if running.owner else _follow_logged(running))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    logger.info(
        "shutting down: NOT_SERVING, draining for up to %.1fs", settings.shutdown_grace_seconds
    )
    await running.stop(settings.shutdown_grace_seconds)
    if supervisor is not None:
        supervisor.cancel()
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


# -- workers of one supervisor (xylen_server.workers) --------------------------------------

OWNER_METHODS = ("Feedback", "Retrain", "WatchRetrain", "RollbackModel", "ReloadModel")
"""ModelService RPCs only the owner of the learning loop (worker 0) answers; the other
workers forward them to it."""
CALLER_KEY = "x-xylen-caller"
"""Metadata of a forwarded call: who made it, as the forwarding worker's credentials check
found (``token:admin``, ``mtls:<name>``, ``anonymous``)."""
INTERNAL_SERVICE = "xylen.internal.Worker"
FOLLOW_SECONDS = 2.0
"""How often a worker other than the owner checks the model directory for a change it was not
told of (it was restarting when the owner swapped)."""
PEER_TIMEOUT_SECONDS = 5.0
FOLLOW_TIMEOUT_SECONDS = 120.0


class WorkerLinks:
    """A worker's channels to the other workers' internal servers (opened on first use)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.worker_run_dir is not None
        self.settings = settings
        self.run_dir = settings.worker_run_dir
        self.index = settings.worker_index
        self.count = int(settings.workers) if settings.workers.isdigit() else 1
        self._channels: dict[int, grpc.aio.Channel] = {}

    def socket(self, kind: str, index: int) -> Path:
        return self.run_dir / f"{kind}-{index}.sock"

    def channel(self, index: int) -> grpc.aio.Channel:
        channel = self._channels.get(index)
        if channel is None:
            size = self.settings.max_message_bytes
            channel = grpc.aio.insecure_channel(
                f"unix:{self.socket('worker', index)}",
                options=[
                    ("grpc.max_receive_message_length", size),
                    ("grpc.max_send_message_length", size),
                ],
            )
            self._channels[index] = channel
        return channel

    def others(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]

    async def _call(self, index: int, method: str, data: bytes, timeout: float) -> bytes:
        call = self.channel(index).unary_unary(f"/{INTERNAL_SERVICE}/{method}")
        answer = await call(data, timeout=timeout)
        assert isinstance(answer, bytes)
        return answer

    async def find(self, prediction_id: str) -> LoggedPrediction | None:
        """The owner's Feedback join: ``prediction_id`` from the other workers' logs."""

        async def ask(index: int) -> LoggedPrediction | None:
            try:
                data = await self._call(
                    index, "FindPrediction", prediction_id.encode(), PEER_TIMEOUT_SECONDS
                )
            except grpc.aio.AioRpcError as exc:
                logger.warning("worker %d did not answer a lookup: %s", index, exc.code())
                return None
            return decode_prediction(data) if data else None

        for found in await asyncio.gather(*(ask(i) for i in self.others())):
            if found is not None:
                return found
        return None

    async def tell_followers(self, model: LoadedModel) -> None:
        """The owner after a swap: every other worker loads the model directory now."""

        async def tell(index: int) -> None:
            try:
                data = await self._call(index, "Follow", b"", FOLLOW_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as exc:
                logger.warning(
                    "worker %d not told of v%d now (%s); it checks the model directory itself",
                    index,
                    model.meta.version,
                    exc.code(),
                )
                return
            logger.info("worker %d follows: serving v%s", index, data.decode(errors="replace"))

        await asyncio.gather(*(tell(i) for i in self.others()))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def encode_prediction(row: LoggedPrediction) -> bytes:
    """One logged prediction for another worker (float32 features exact through float64)."""
    return json.dumps(
        {
            "prediction_id": row.prediction_id,
            "time_ms": row.time_ms,
            "model_name": row.model_name,
            "model_version": row.model_version,
            "features": [float(v) for v in row.features],
            "probability_up": row.probability_up,
            "signal": row.signal,
        }
    ).encode()


def decode_prediction(data: bytes) -> LoggedPrediction:
    raw = json.loads(data)
    return LoggedPrediction(
        prediction_id=str(raw["prediction_id"]),
        time_ms=int(raw["time_ms"]),
        model_name=str(raw["model_name"]),
        model_version=int(raw["model_version"]),
        features=np.asarray(raw["features"], dtype=np.float32),
        probability_up=float(raw["probability_up"]),
        signal=int(raw["signal"]),
    )


def _forward_to_owner(servicer: ModelServicer, links: WorkerLinks) -> None:
    """A worker other than the owner: its OWNER_METHODS call the owner's (after this
    worker's interceptors checked credentials and admitted the call), and its GetModelInfo
    carries the owner's training status (the only one that runs retrain jobs)."""
    stub = pb_grpc.ModelServiceStub(links.channel(0))
    for name in OWNER_METHODS:
        call = getattr(stub, name)
        forward = _forward_stream(call) if name == "WatchRetrain" else _forward_unary(call)
        setattr(servicer, name, forward)
    own_info = servicer.GetModelInfo

    async def model_info(request: pb.GetModelInfoRequest, context: Any) -> pb.GetModelInfoResponse:
        """This worker's model (the one its Predicts use), with the owner's training status:
        its own retrainer never runs a job, so it said IDLE on half the connections while
        the owner's job ran or had failed."""
        response = await own_info(request, context)
        timeout = min(context.time_remaining() or PEER_TIMEOUT_SECONDS, PEER_TIMEOUT_SECONDS)
        try:
            owner = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            response.model_info.training_status.CopyFrom(
                pb.TrainingStatus(
                    message="the training status is not known: worker 0, which runs retrain "
                    f"jobs, did not answer ({exc.code().name}); retry shortly"
                )
            )
            return response
        response.model_info.training_status.CopyFrom(owner.model_info.training_status)
        return response

    servicer.GetModelInfo = model_info  # type: ignore[method-assign]


def _forward_unary(call: Any) -> Callable[[Any, Any], Awaitable[Any]]:
    async def forward(request: Any, context: Any) -> Any:
        try:
            return await call(
                request,
                metadata=((CALLER_KEY, auth.caller()),),
                timeout=context.time_remaining(),
            )
        except grpc.aio.AioRpcError as exc:
            await _relay(context, exc)

    return forward


def _forward_stream(call: Any) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def forward(request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for answer in call(
                request,
                metadata=((CALLER_KEY, auth.caller()),),
                timeout=context.time_remaining(),
            ):
                yield answer
        except grpc.aio.AioRpcError as exc:
            await _relay(context, exc)

    return forward


async def _relay(context: Any, exc: grpc.aio.AioRpcError) -> None:
    """The owner's answer (status and ErrorInfo) as this call's; an owner that cannot be
    reached is UNAVAILABLE OWNER_UNAVAILABLE (it is being restarted: retry)."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is not None:
        await context.abort_with_status(rpc_status.to_status(status))
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        raise Unavailable(
            "the worker that owns feedback and retraining (worker 0) is not answering; "
            "retry shortly",
            reason="OWNER_UNAVAILABLE",
        )
    await context.abort(exc.code(), (exc.details() or "")[:200])


class _ForwardedCaller(HandlerInterceptor):
    """The internal server: a call is made by whom :data:`CALLER_KEY` names."""

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        def source(context: Any) -> str:
            for key, value in context.invocation_metadata() or ():
                if key == CALLER_KEY:
                    return str(value)[:200]
            return auth.ANONYMOUS

        return auth.run_as(handler, source)


def _internal_server(
    running: Running, servicer: ModelServicer, links: WorkerLinks
) -> grpc.aio.Server:
    """The worker's server on its unix socket (in the supervisor's 0700 run directory)."""
    settings = running.settings
    internal = grpc.aio.server(
        interceptors=[ErrorStatusInterceptor(), _ForwardedCaller()],
        options=server_options(settings.max_message_bytes),
    )
    if running.owner:
        pb_grpc.add_ModelServiceServicer_to_server(servicer, internal)
        running.feedback.find_elsewhere = links.find
        running.models.on_change.append(links.tell_followers)

    async def find(request: bytes, context: Any) -> bytes:
        prediction_id = request.decode(errors="replace")
        row = await asyncio.to_thread(running.feedback.log.find_recent, prediction_id)
        return b"" if row is None else encode_prediction(row)

    async def follow(request: bytes, context: Any) -> bytes:
        return str(await _follow(running)).encode()

    internal.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                INTERNAL_SERVICE,
                {
                    "FindPrediction": grpc.unary_unary_rpc_method_handler(find),
                    "Follow": grpc.unary_unary_rpc_method_handler(follow),
                },
            ),
        )
    )
    path = links.socket("worker", settings.worker_index)
    path.unlink(missing_ok=True)
    bind(internal, f"unix:{path}", None)
    return internal


async def _follow(running: Running) -> int:
    """A worker other than the owner: serve the model directory's model if it is not the one
    served (the owner promoted, rolled back or reloaded); returns the version served. It
    neither archives nor prunes: the owner keeps the history."""
    predictor, settings = running.predictor, running.settings
    if not predictor.ready:
        return 0  # still loading: the load reads the directory, the next check catches up
    async with running.models.lock:
        current = predictor.model
        try:
            meta = await asyncio.to_thread(ModelMetadata.read, settings.model_dir)
        except (MetadataError, OSError) as exc:
            raise ModelLoadError(f"cannot follow the model directory: {exc}") from exc
        if meta.version == current.meta.version and meta.checksums == current.meta.checksums:
            return current.meta.version
        loaded = await asyncio.get_running_loop().run_in_executor(None, load_model, settings)
        await predictor.swap(loaded, settings.shutdown_grace_seconds)
        running.models.swaps["reloaded"] += 1
        logger.info(
            "following the owner: now serving %s v%d (was v%d)",
            loaded.meta.name,
            loaded.meta.version,
            current.meta.version,
        )
        return loaded.meta.version


async def _follow_logged(running: Running) -> None:
    try:
        await _follow(running)
    except Exception as exc:
        logger.error("could not follow the model directory, the served model stays: %s", exc)


async def _keep_following(running: Running) -> None:
    last = ""
    while True:
        await asyncio.sleep(FOLLOW_SECONDS)
        try:
            await _follow(running)
            last = ""
        except Exception as exc:
            if str(exc) != last:  # once per cause
                logger.error("could not follow the model directory: %s", exc)
            last = str(exc)


async def _obey_supervisor(running: Running, stop: asyncio.Event) -> None:
    """A worker's stdin: ``serving`` / ``hold`` from the supervisor; EOF (it is gone): stop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        word = line.strip()
        if word == b"serving":
            await running.health.open_gate(True)
        elif word == b"hold":
            await running.health.open_gate(False)
    logger.warning("the supervisor is gone: stopping")
    stop.set()
