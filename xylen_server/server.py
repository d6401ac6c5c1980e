"""Building and running the gRPC server.

:func:`build_server` wires servicer, health, reflection and interceptors and binds the port
(returning the one it got, so tests can ask for port 0). :func:`serve` only starts, loads the
model while health says NOT_SERVING, flips to SERVING, and on SIGTERM flips back, drains the
calls in flight, closes the feedback store and prediction log and returns 0. SIGHUP re-reads the
model directory and hot-swaps to it when it changed (as the ReloadModel RPC does).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.api.interceptors import MetricsInterceptor
from xylen_server.api.metrics import Recorder
from xylen_server.api.servicer import ModelServicer
from xylen_server.errors import ModelLoadError
from xylen_server.health import set_health
from xylen_server.learning.feedback import Learning
from xylen_server.learning.retrainer import Retrainer
from xylen_server.serving.model_store import LoadedModel, load_model
from xylen_server.serving.predictor import Predictor
from xylen_server.settings import Settings
from xylen_server.versions.swap import ModelManager

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelService"].full_name
_HEALTH_SERVICES = ("", SERVICE_NAME)


@dataclass
class Running:
    """A built server and the parts a caller needs to drive it."""

    server: grpc.aio.Server
    port: int
    predictor: Predictor
    health: health.aio.HealthServicer
    recorder: Recorder
    learning: Learning
    models: ModelManager
    retrainer: Retrainer

    async def start_learning(self, model: LoadedModel) -> None:
        """After the first model is installed: keep it in the history, count the feedback it
        has not seen, start the retrain schedule."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.models.keep_serving_version)
        await self.retrainer.start_up(model)

    async def close_learning(self) -> None:
        """Cancel a running retrain, flush the prediction log, close the feedback store."""
        await self.retrainer.close()
        await asyncio.get_running_loop().run_in_executor(None, self.learning.close)

    async def set_serving(self, serving: bool) -> None:
        await set_health(self.health, _HEALTH_SERVICES, serving)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Let long-lived coordinator channels keep their connections alive with pings.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]


async def build_server(
    settings: Settings,
    credentials: grpc.ServerCredentials | None = None,
    recorder: Recorder | None = None,
) -> Running:
    """Build (not start) a server on ``settings.host:settings.grpc_port``.

    ``credentials`` are passed in by the caller (TLS/mTLS); None serves plaintext.
    """
    recorder = recorder or Recorder()
    server = grpc.aio.server(
        interceptors=[MetricsInterceptor(recorder)], options=server_options(settings)
    )
    predictor = Predictor(settings)
    learning = Learning(settings)
    models = ModelManager(settings, predictor)
    retrainer = Retrainer(settings, learning, models)
    pb_grpc.add_ModelServiceServicer_to_server(
        ModelServicer(predictor, learning, models, retrainer), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC port {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot bind gRPC port {address}")
    running = Running(
        server, port, predictor, health_servicer, recorder, learning, models, retrainer
    )
    await running.set_serving(False)
    return running


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    running = await build_server(settings)
    await running.server.start()
    logger.info(
        "listening on %s:%d (NOT_SERVING until the model is ready)", settings.host, running.port
    )
    print(f"xylen-server listening on port {running.port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    loading = loop.run_in_executor(None, load_model, settings)
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait(
        [cast(asyncio.Future[Any], loading), stopping], return_when=asyncio.FIRST_COMPLETED
    )
    if loading not in done:
        logger.info("stopped while loading the model")
        await running.server.stop(0)
        return 0
    try:
        model = loading.result()
    except ModelLoadError as exc:
        print(f"xylen-server: error: {exc}", file=sys.stderr, flush=True)
        await running.server.stop(0)
        return 2
    running.predictor.install(model)
    await running.start_learning(model)
    await running.set_serving(True)
    logger.info("SERVING %s v%d on port %d", model.meta.name, model.meta.version, running.port)

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
    await running.set_serving(False)
    await running.server.stop(settings.shutdown_grace_seconds)
    await running.close_learning()
    running.predictor.model.close()
    logger.info("stopped cleanly")
    return 0


async def _reload(running: Running) -> None:
    """SIGHUP: swap to the model directory's model if it changed; a bad one is logged, kept out."""
    try:
        model, changed = await running.models.reload()
    except Exception as exc:
        logger.error("reload refused, the served model stays: %s", exc)
        return
    if not changed:
        logger.info("reload: the model directory still holds v%d", model.meta.version)
