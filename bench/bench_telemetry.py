"""What observability costs: Predict p50/p99 at batch 1 with 1 and 32 calls in flight,
throughput at 32 and server CPU per call, side by side on four server processes serving the
same model, called in turn (short alternating slices):

* metrics off (``METRICS_ENABLED=false``: no metrics instruments, no metrics port);
* metrics on (the default: counts, the latency histogram, ``/metrics`` served), tracing off;
* no trace hooks (metrics on, ``TRACE_HOOKS=false``: Predict built without the one flag read
  that tracing off costs), the baseline of "tracing off costs nothing";
* tracing on (metrics on, ``OTEL_TRACES_EXPORTER=otlp`` to a loopback port where nothing
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
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench.bench_server import (
    Load,
    Process,
    Target,
    _unary_slice,
    build_model,
    measure,
    report,
    start_server,
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
    server = start_server(env)
    metrics_port = 0
    if extra.get("METRICS_ENABLED") != "false":
        assert server.proc.stdout is not None
        metrics_port = int(server.proc.stdout.readline().rsplit(" ", 1)[1])
    return server, metrics_port


TARGETS = {
    "metrics off": {"METRICS_ENABLED": "false"},
    "metrics on": {},
    "no trace hooks": {"TRACE_HOOKS": "false"},
    "tracing on": {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": ""},
}
"""The servers, all with metrics on but the first; "metrics on" is also "tracing off"."""

RATIOS = (
    ("metrics on / metrics off", "metrics on", "metrics off"),
    ("tracing off / no trace hooks", "metrics on", "no trace hooks"),
    ("tracing on / tracing off", "tracing on", "metrics on"),
)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per target and level")
    parser.add_argument("--trees", type=int, default=500)
    args = parser.parse_args(argv)
    dead = f"http://127.0.0.1:{_free_port()}"
    targets = {name: dict(extra) for name, extra in TARGETS.items()}
    targets["tracing on"]["OTEL_EXPORTER_OTLP_ENDPOINT"] = dead
    levels = (1, 32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, rows = build_model(root / "models", args.trees)
        request = pb.PredictRequest(
            inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[0].tolist()))]
        )
        servers: dict[str, tuple[Process, int]] = {}
        try:
            for name, extra in targets.items():
                servers[name] = _start(model_dir.parent, name.replace(" ", "-"), extra)
            print(
                f"\n== observability cost: Predict, batch 1, {args.trees}-tree LightGBM, "
                f"{len(servers)} servers called in turn, {args.seconds:.0f}s each per level "
                f"(grpcio {grpc.__version__}) =="
            )

            async def run() -> dict[tuple[str, int], Load]:
                channels = {
                    name: grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
                    for name, (server, _) in servers.items()
                }
                try:
                    loads: list[Target] = []
                    for name, channel in channels.items():
                        stub = pb_grpc.ModelServiceStub(channel)
                        await stub.Predict(request)
                        loads.append(
                            Target(
                                name,
                                servers[name][0].proc.pid,
                                lambda c, s, load, stub=stub: _unary_slice(
                                    lambda: stub.Predict(request), c, s, load.latencies, load.errors
                                ),
                            )
                        )
                    return await measure(loads, levels, args.seconds)
                finally:
                    for channel in channels.values():
                        await channel.close()

            loads = asyncio.run(run())
            report(loads, list(servers), "metrics off", levels)
            print("  ratios (1.00 = no cost; p50/p99 at 1 and 32 in flight, req/s at 32):")
            for label, a, b in RATIOS:
                parts = []
                for level in levels:
                    x, y = loads[(a, level)], loads[(b, level)]
                    parts.append(
                        f"@{level}: p50 {x.percentile(0.5) / y.percentile(0.5):.3f}x "
                        f"p99 {x.percentile(0.99) / y.percentile(0.99):.3f}x "
                        f"CPU/call {x.cpu_us / y.cpu_us:.3f}x"
                    )
                x, y = loads[(a, 32)], loads[(b, 32)]
                print(f"    {label:<30} req/s@32 {x.rps / y.rps:.3f}x  " + "  ".join(parts))

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
            for server, _ in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
