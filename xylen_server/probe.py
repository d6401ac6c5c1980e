"""``python -m xylen_server.probe``: exit 0 when a gRPC server answers SERVING on grpc.health.v1.

The container HEALTHCHECK, the compose health checks and ``make status`` all ask this way::

    python -m xylen_server.probe                      # 127.0.0.1:$GRPC_PORT (default 8001)
    python -m xylen_server.probe 127.0.0.1:50051      # the coordinator
    python -m xylen_server.probe --service xylen.v1.ModelService

Exit codes: 0 SERVING, 1 anything else (NOT_SERVING, unreachable, timed out), 2 bad arguments.
Plaintext only: a server that speaks TLS is probed on its metrics port or from inside its network.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The health status name of ``service`` at ``address`` ("UNREACHABLE" when no answer)."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        return "UNREACHABLE" if code in (None, grpc.StatusCode.UNAVAILABLE) else code.name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xylen_server.probe", description=__doc__)
    parser.add_argument(
        "address",
        nargs="?",
        default=f"127.0.0.1:{os.environ.get('GRPC_PORT', '8001')}",
        help="host:port (default 127.0.0.1:$GRPC_PORT)",
    )
    parser.add_argument("--service", default="", help='health service name ("": whole server)')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    args = parser.parse_args(argv)
    status = check(args.address, args.service, args.timeout)
    print(f"{args.address} {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
