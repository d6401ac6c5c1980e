"""What TLS and credentials cost: Predict p50/p99 at batch 1 over loopback, side by side on four
server processes serving the same model, called in turn on long-lived channels:

* plaintext (the default on loopback);
* TLS (server certificate only);
* mutual TLS (the client presents a certificate the server's CA signed);
* mutual TLS + token (``PREDICT_TOKEN`` set: every Predict carries and is checked for a bearer
  token by the auth interceptor).

Certificates come from ``make certs``' generator (EC P-256). ``python -m bench.bench_security
[--seconds S]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.bench_server import Process, _interleaved_latency, build_model
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2
from xylen_server.devtools.certs import write_certs
from xylen_server.tls import ClientTls, open_channel

TOKEN = "bench-predict-token"


def _start(model_root: Path, extra: dict[str, str], tls: ClientTls | None) -> Process:
    env = dict(
        os.environ,
        MODEL_PATH=str(model_root),
        MODEL_NAME="model_1",
        GRPC_HOST="127.0.0.1",
        GRPC_PORT="0",
        METRICS_PORT="0",
        LOG_LEVEL="WARNING",
        FEEDBACK_DATA_DIR=str(model_root.parent / f"data-{len(extra)}-{tls is not None}"),
        **extra,
    )
    server = Process([sys.executable, "-m", "xylen_server"], env, "listening on port")
    with open_channel(f"127.0.0.1:{server.port}", tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return server
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    server.stop()
    raise RuntimeError("xylen server did not become SERVING")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per target")
    parser.add_argument("--trees", type=int, default=500)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, rows = build_model(root / "models", args.trees)
        certs = write_certs(root / "certs")
        server_tls = {
            "TLS_CERT_FILE": str(certs.server_cert),
            "TLS_KEY_FILE": str(certs.server_key),
        }
        mtls = {**server_tls, "TLS_CLIENT_CA_FILE": str(certs.ca)}
        dial_tls = ClientTls(ca=certs.ca)
        dial_mtls = ClientTls(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
        targets: dict[str, tuple[dict[str, str], ClientTls | None, str]] = {
            "plaintext": ({}, None, ""),
            "TLS": (server_tls, dial_tls, ""),
            "mTLS": (mtls, dial_mtls, ""),
            "mTLS + token": (
                {**mtls, "PREDICT_TOKEN": TOKEN, "ADMIN_TOKEN": "bench-admin-token"},
                dial_mtls,
                TOKEN,
            ),
        }
        servers: list[Process] = []
        channels: list[grpc.Channel] = []
        try:
            calls: dict[str, Callable[[], object]] = {}
            request = pb.PredictRequest(
                inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[0].tolist()))]
            )
            for name, (env, dial, token) in targets.items():
                server = _start(model_dir.parent, env, dial)
                servers.append(server)
                channel = open_channel(f"127.0.0.1:{server.port}", dial)
                channels.append(channel)
                stub = pb_grpc.ModelServiceStub(channel)
                metadata = (("authorization", f"Bearer {token}"),) if token else None
                stub.Predict(request, metadata=metadata, timeout=10)  # connected and allowed

                def call(stub=stub, metadata=metadata) -> object:  # type: ignore[no-untyped-def]
                    return stub.Predict(request, metadata=metadata)

                calls[name] = call
            print(
                f"\n== Predict, batch 1, {args.trees}-tree LightGBM, four servers called in turn "
                f"(grpcio {grpc.__version__}) =="
            )
            latency = _interleaved_latency(calls, args.seconds)
            floor = latency["plaintext"][0]
            for name, (p50, p99) in latency.items():
                print(
                    f"  {name:<14}: p50 {p50:7.0f} us  p99 {p99:7.0f} us  "
                    f"({p50 / floor:.2f}x plaintext p50)"
                )
        finally:
            for channel in channels:
                channel.close()
            for server in servers:
                server.stop()


if __name__ == "__main__":
    main()
