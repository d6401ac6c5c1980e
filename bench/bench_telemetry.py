"""What observability costs: Predict p50/p99 at batch 1 and throughput at 32 calls in flight,
side by side on three server processes serving the same model, called in turn:

* metrics off (``METRICS_ENABLED=false``: no metrics interceptor timing, no metrics port);
* metrics on (the default: the interceptor, the OpenTelemetry instruments, ``/metrics`` served);
* metrics and tracing on (``OTEL_TRACES_EXPORTER=otlp`` to a loopback port where nothing
  listens: every call records its server span and its featurise, inference and log spans into
  the batch processor, whose exports fail and are dropped; a real collector adds its network
  cost on the exporter's thread).

A scrape of ``/metrics`` is also timed on the metrics-on server. ``python -m bench.bench_telemetry
[--seconds S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.bench_server import (
    Process,
    _interleaved_latency,
    _interleaved_throughput,
    _unary_slice,
    build_model,
)
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(model_root: Path, name: str, extra: dict[str, str]) -> tuple[Process, int]:
    env = dict(
        os.environ,
        MODEL_PATH=str(model_root),
        MODEL_NAME="model_1",
        GRPC_HOST="127.0.0.1",
        GRPC_PORT="0",
        METRICS_PORT="0",
        LOG_LEVEL="ERROR",  # the failing OTLP exports would log every batch
        FEEDBACK_DATA_DIR=str(model_root.parent / f"data-{name}"),
        **extra,
    )
    if "OTEL_TRACES_EXPORTER" not in extra:  # tracing only where the target asks for it
        for key in [k for k in env if k.startswith("OTEL_")]:
            del env[key]
    server = Process([sys.executable, "-m", "xylen_server"], env, "listening on port")
    metrics_port = 0
    if extra.get("METRICS_ENABLED") != "false":
        assert server.proc.stdout is not None
        metrics_port = int(server.proc.stdout.readline().rsplit(" ", 1)[1])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return server, metrics_port
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    server.stop()
    raise RuntimeError("xylen server did not become SERVING")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per target and measurement")
    parser.add_argument("--trees", type=int, default=500)
    args = parser.parse_args(argv)
    dead = f"http://127.0.0.1:{_free_port()}"
    targets = {
        "metrics off": {"METRICS_ENABLED": "false"},
        "metrics on": {},
        "metrics+tracing": {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": dead},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, rows = build_model(root / "models", args.trees)
        request = pb.PredictRequest(
            inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[0].tolist()))]
        )
        servers: dict[str, tuple[Process, int]] = {}
        channels: list[grpc.Channel] = []
        try:
            calls: dict[str, Callable[[], object]] = {}
            for name, extra in targets.items():
                servers[name] = _start(model_dir.parent, name.replace(" ", "-"), extra)
                channel = grpc.insecure_channel(f"127.0.0.1:{servers[name][0].port}")
                channels.append(channel)
                stub = pb_grpc.ModelServiceStub(channel)
                stub.Predict(request, timeout=10)
                calls[name] = lambda stub=stub: stub.Predict(request)
            print(
                f"\n== observability cost: Predict, batch 1, {args.trees}-tree LightGBM, three "
                f"servers called in turn (grpcio {grpc.__version__}) =="
            )
            latency = _interleaved_latency(calls, args.seconds)
            floor_p50, floor_p99 = latency["metrics off"]
            for name, (p50, p99) in latency.items():
                print(
                    f"  {name:<16}: p50 {p50:7.0f} us  p99 {p99:7.0f} us  "
                    f"({p50 / floor_p50:.3f}x / {p99 / floor_p99:.3f}x metrics off)"
                )

            async def throughput() -> dict[str, float]:
                aio_channels = [
                    grpc.aio.insecure_channel(f"127.0.0.1:{servers[name][0].port}")
                    for name in targets
                ]
                try:
                    slices: dict[str, Callable[[float], object]] = {}
                    for name, channel in zip(targets, aio_channels, strict=True):
                        stub = pb_grpc.ModelServiceStub(channel)
                        await stub.Predict(request)
                        slices[name] = lambda s, stub=stub: _unary_slice(
                            lambda: stub.Predict(request), 32, s
                        )
                    return await _interleaved_throughput(slices, args.seconds)
                finally:
                    for channel in aio_channels:
                        await channel.close()

            rps = asyncio.run(throughput())
            floor = rps["metrics off"]
            print("  throughput at 32 in flight (one HTTP/2 connection per server):")
            for name, value in rps.items():
                print(f"    {name:<16}: {value:6.0f} req/s ({value / floor:.3f}x metrics off)")

            port = servers["metrics on"][1]
            scrapes = []
            for _ in range(50):
                started = time.perf_counter()
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    body = r.read()
                scrapes.append(time.perf_counter() - started)
            scrapes.sort()
            lines = body.count(b"\n")
            print(
                f"  GET /metrics: p50 {scrapes[25] * 1e3:.2f} ms, {len(body) / 1024:.1f} KiB "
                f"({lines} lines)"
            )
        finally:
            for channel in channels:
                channel.close()
            for server, _ in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
