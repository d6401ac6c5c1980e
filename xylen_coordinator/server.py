"""Building and running the coordinator's gRPC server.

:func:`build_server` wires the EnsembleService, health and reflection and binds the port
(returning the one it got, so tests can ask for port 0). :func:`serve` starts the coordinator,
flips health to SERVING, reloads the configuration on SIGHUP (and, if asked, when the file
changes), and on SIGTERM flips to NOT_SERVING, drains the calls in flight and returns 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import ensemble_service_pb2_grpc as epb_grpc
from xylen_coordinator.config import MAX_MESSAGE_BYTES, ConfigError
from xylen_coordinator.coordinator import AsyncCoordinator
from xylen_coordinator.servicer import EnsembleServicer
from xylen_coordinator.undecodable import UndecodableInterceptor
from xylen_server.auth import AuthInterceptor, ServerSecurity, check_exposure
from xylen_server.errors import ErrorStatusInterceptor, SettingsError
from xylen_server.health import Health, bind, server_options
from xylen_server.settings import Settings
from xylen_server.telemetry import MetricsHttp, server_tracing_interceptor, tracing_enabled
from xylen_server.tls import server_credentials

logger = logging.getLogger(__name__)

SERVICE_NAME = epb.DESCRIPTOR.services_by_name["EnsembleService"].full_name


@dataclass
class Running:
    """A built coordinator server and the parts a caller needs to drive it."""

    server: grpc.aio.Server
    port: int
    health: Health
    metrics_http: MetricsHttp | None = None
    """``/metrics`` and ``/health`` (None: metrics off)."""
    metrics_port: int = 0

    async def set_serving(self, serving: bool) -> None:
        await self.health.set(serving)


async def build_server(
    coordinator: AsyncCoordinator,
    host: str,
    port: int,
    security: Settings | None = None,
    metrics_port: int | None = None,
) -> Running:
    """Build (not start) a server for ``coordinator`` on ``host:port``.

    ``security`` holds the server-side TLS and credential settings (``TLS_*``, ``ADMIN_*``,
    ``PREDICT_TOKEN*``, ``ALLOW_INSECURE_ADMIN``: the model server's environment variables,
    :class:`~xylen_server.settings.Settings`); None serves plaintext with open RPCs, and only on
    loopback. Raises SettingsError before binding when the admin RPC (Feedback) would be open on
    a non-loopback address, or open at all while ``auth.token_file`` makes what it forwards
    count as authenticated. ``metrics_port`` (0: a free one; None: none) serves ``/metrics``
    and ``/health`` on ``host``; a port that cannot be bound is a SettingsError too.
    """
    settings = security if security is not None else Settings()
    checks = ServerSecurity.from_settings(settings)
    check_exposure(checks, host)
    laundering = checks.admin_open and not checks.mtls and not checks.allow_insecure_admin
    if coordinator.config.auth.token and laundering:
        # Anyone's outcome would reach the servers under the coordinator's token, and count as
        # authenticated for their retrain gates.
        raise SettingsError(
            "auth.token_file makes forwarded outcomes authenticated on the model servers, "
            "so the coordinator's own Feedback needs credentials too: set ADMIN_TOKEN or "
            "ADMIN_TOKEN_FILE, use mutual TLS, or set ALLOW_INSECURE_ADMIN=true"
        )
    credentials = server_credentials(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )
    interceptors: list[grpc.aio.ServerInterceptor] = [
        ErrorStatusInterceptor(),
        AuthInterceptor(checks),
        UndecodableInterceptor(f"/{SERVICE_NAME}/"),
    ]
    if tracing_enabled():
        interceptors.insert(0, server_tracing_interceptor())
    server = grpc.aio.server(interceptors=interceptors, options=server_options(MAX_MESSAGE_BYTES))
    epb_grpc.add_EnsembleServiceServicer_to_server(EnsembleServicer(coordinator), server)
    health = Health(server, (SERVICE_NAME,))
    bound = bind(server, f"{host}:{port}", credentials)
    running = Running(server, bound, health)
    if metrics_port is not None:
        from xylen_coordinator.telemetry import CoordinatorTelemetry

        telemetry = CoordinatorTelemetry(coordinator)
        coordinator.observer = telemetry
        running.metrics_http = MetricsHttp(telemetry.meters, telemetry.health, telemetry.refresh)
        running.metrics_port = await running.metrics_http.start(host, metrics_port)
    await running.set_serving(False)
    return running


async def _reload(coordinator: AsyncCoordinator) -> None:
    try:
        config = await coordinator.reload()
    except ConfigError as exc:
        logger.error("configuration NOT reloaded, keeping the old one: %s", exc)
    except Exception:
        logger.exception("configuration NOT reloaded, keeping the old one")
    else:
        logger.info(
            "reloaded %s: %s",
            config.source,
            ", ".join(
                f"{e.name}={e.weight:g}{'' if e.enabled else ' (disabled)'}"
                for e in config.model_endpoints
            ),
        )


def _file_state(path: Path) -> tuple[float, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime, st.st_size, st.st_ino)


async def _watch_file(coordinator: AsyncCoordinator, interval: float) -> None:
    """Reload when the configuration file's mtime, size or inode changes (cheap polling)."""
    path = coordinator.config.source
    if path is None:
        return
    last = _file_state(path)
    while True:
        await asyncio.sleep(interval)
        state = _file_state(path)
        if state is not None and state != last:
            last = state
            logger.info("%s changed; reloading", path)
            await _reload(coordinator)


async def serve(
    coordinator: AsyncCoordinator,
    host: str = "127.0.0.1",
    port: int = 50051,
    watch_seconds: float = 0.0,
    grace_seconds: float = 5.0,
    security: Settings | None = None,
    metrics_port: int | None = None,
) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    try:
        running = await build_server(coordinator, host, port, security, metrics_port)
    except SettingsError as exc:
        print(f"xylen-coordinator: error: {exc}", file=sys.stderr, flush=True)
        return 2
    await running.server.start()
    print(f"xylen-coordinator listening on port {running.port}", flush=True)
    if running.metrics_http is not None:
        print(f"xylen-coordinator metrics on port {running.metrics_port}", flush=True)
    try:
        await coordinator.start()
    except BaseException:  # the caller reports why; the listener and /metrics go first
        await running.server.stop(None)
        if running.metrics_http is not None:
            await running.metrics_http.stop()
        raise
    await running.set_serving(True)
    logger.info(
        "SERVING the ensemble of %s on port %d",
        ", ".join(e.name for e in coordinator.config.enabled_endpoints),
        running.port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_hangup() -> None:
        logger.info("SIGHUP: reloading %s", coordinator.config.source)
        task = asyncio.create_task(_reload(coordinator))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    watcher = (
        asyncio.create_task(_watch_file(coordinator, watch_seconds)) if watch_seconds > 0 else None
    )
    await stop.wait()
    logger.info("shutting down: NOT_SERVING, draining for up to %.1fs", grace_seconds)
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    await running.set_serving(False)
    await running.server.stop(grace_seconds)
    if running.metrics_http is not None:
        await running.metrics_http.stop()
    await coordinator.close()
    logger.info("stopped cleanly")
    return 0
