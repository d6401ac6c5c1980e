"""grpc.health.v1 as both servers report it: the whole server ("") and its service together."""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2


async def set_health(
    servicer: health.aio.HealthServicer, services: tuple[str, ...], serving: bool
) -> None:
    """Report every one of ``services`` ("" is the whole server) as SERVING or NOT_SERVING."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in services:
        await servicer.set(name, status)
