"""What both gRPC servers (model server and coordinator) share: channel options, grpc.health.v1
and reflection.

Health is reported for the whole server ("") and for its service together, so a probe that
asks either gets the same answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from xylen_server.errors import InterceptedRegistration


def server_options(max_message_bytes: int, reuse_port: bool = False) -> list[tuple[str, int]]:
    """Options of a xylen gRPC server: message size limits and keepalive that lets long-lived
    coordinator channels keep their connections with pings. ``SO_REUSEPORT`` is off, so a
    second process cannot bind the port by mistake, unless ``reuse_port`` (the workers of one
    supervisor, which holds the port against any other process: xylen_server.workers)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


class Health:
    """grpc.health.v1 for ``services`` and the whole server, NOT_SERVING until told otherwise.

    ``gated`` (a worker of several): SERVING also needs :meth:`open_gate`, which the supervisor
    asks for once every worker is ready, so a probe sees SERVING only when all of them are."""

    def __init__(
        self,
        server: grpc.aio.Server | InterceptedRegistration,
        services: Sequence[str],
        gated: bool = False,
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        self.services = ("", *services)
        self.serving = False
        """What is reported (read by ``/health`` and the metrics)."""
        self.ready = False
        """What the last :meth:`set` said: this server's own readiness."""
        self.gate_open = not gated
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        # What enable_server_reflection does for an aio server, also through a registration
        # that wraps handlers (xylen_server.errors.InterceptedRegistration), which it would
        # not recognise as one.
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                (*services, health.SERVICE_NAME, reflection.SERVICE_NAME)
            ),
            server,
        )

    async def set(self, serving: bool) -> None:
        """Report every service and the whole server as SERVING or NOT_SERVING (SERVING only
        while the gate is open)."""
        self.ready = serving
        await self._report()

    async def open_gate(self, open_: bool) -> None:
        """Let :meth:`set`'s readiness through (True) or hold NOT_SERVING (False)."""
        self.gate_open = open_
        await self._report()

    async def _report(self) -> None:
        serving = self.ready and self.gate_open
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.serving = serving
        for name in self.services:
            await self.servicer.set(name, status)


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``address`` (plaintext when ``credentials`` is None); returns the bound port or
    raises OSError naming the address."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC port {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot bind gRPC port {address}")
    return port
