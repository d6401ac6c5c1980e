"""xylen against MLServer on the same model, batch and load shape (``make bench-peers``).

MLServer (with its LightGBM runtime) runs from its own venv (``.venv-peers``, made by the make
target) and serves the same ``lightgbm_model.txt`` that training writes, over its gRPC (KServe
v2 ``ModelInfer``); xylen serves it over unary ``Predict``. One client drives both the same way:
pre-serialized request bytes (one row, batch 1) sent with grpc.aio at 1, 8 and 32 calls in
flight, responses taken as bytes, so the client's cost is identical for both. Each level runs
the targets in turn for ``--rounds`` rounds and reports medians: p50, p99, calls/s, and the
server's CPU time per call (its process tree, from /proc), then the ratios xylen/MLServer.
MLServer is measured with ``parallel_workers=0`` (inference on its event loop): with its default
of 1 inference worker process, MLServer 1.7.1 as it installs today (2026-12-07) never loads the
model here (the worker dies with "There is no current event loop in thread 'MainThread'");
``--workers 0,1`` measures both where it works, the better being the comparison.

    make bench-peers                      # installs MLServer into .venv-peers once; ~3 minutes
    python -m bench.bench_peers --mlserver .venv-peers/bin/mlserver --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.bench_server import REPO, build_model, start_xylen
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2

MLSERVER_INFER = "/inference.GRPCInferenceService/ModelInfer"
MLSERVER_READY = "/inference.GRPCInferenceService/ModelReady"
XYLEN_PREDICT = "/xylen.v1.ModelService/Predict"
LEVELS = (1, 8, 32)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.bench_peers")
    parser.add_argument(
        "--mlserver", type=Path, default=REPO / ".venv-peers" / "bin" / "mlserver",
        help="the mlserver executable (its venv's python builds the request)",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=4.0, help="per target, level and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--levels", type=lambda text: tuple(int(v) for v in text.split(",")), default=LEVELS,
        help="calls in flight, comma separated",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=lambda text: tuple(int(v) for v in text.split(",")), default=(0,),
        help="MLServer parallel_workers configurations to measure (1, its default, fails to "
        "start here: its worker process dies with 'no current event loop'; try it elsewhere)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.mlserver = args.mlserver.absolute()  # MLServer runs in its model folder
    if args.seconds <= 0 or args.rounds < 1 or not args.levels or min(args.levels) < 1:
        parser.error("--seconds, --rounds and --levels must be positive")
    return args


def model_settings(model_file: Path, name: str = "model_1") -> dict[str, Any]:
    """MLServer's ``model-settings.json`` for a LightGBM booster file."""
    return {
        "name": name,
        "implementation": "mlserver_lightgbm.LightGBMModel",
        "parameters": {"uri": str(model_file), "version": "v1"},
    }


def mlserver_settings(
    grpc_port: int, http_port: int, metrics_port: int, workers: int
) -> dict[str, Any]:
    """MLServer's ``settings.json``: loopback only, the given ports and inference workers."""
    return {
        "host": "127.0.0.1",
        "grpc_port": grpc_port,
        "http_port": http_port,
        "metrics_port": metrics_port,
        "parallel_workers": workers,
        "debug": False,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BUILD_REQUEST = """
import sys
from mlserver.grpc import dataplane_pb2 as pb
values = [float(v) for v in sys.argv[1].split(",")]
request = pb.ModelInferRequest(model_name="model_1", inputs=[pb.ModelInferRequest.InferInputTensor(
    name="input-0", datatype="FP32", shape=[1, len(values)],
    contents=pb.InferTensorContents(fp32_contents=values))])
sys.stdout.buffer.write(request.SerializeToString())
"""

READ_RESPONSE = """
import sys
from mlserver.grpc import dataplane_pb2 as pb
response = pb.ModelInferResponse.FromString(sys.stdin.buffer.read())
out = response.outputs[0]
values = list(out.contents.fp64_contents) or list(out.contents.fp32_contents)
if not values and response.raw_output_contents:
    import numpy as np
    values = np.frombuffer(response.raw_output_contents[0], dtype=np.float64).tolist()
print(values[-1])
"""


def _cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its descendants, from /proc."""
    total = 0.0
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        todo.extend(children.get(current, []))
    return total


async def _drive(
    address: str, method: str, body: bytes, in_flight: int, seconds: float
) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out: no (de)serialization cost
        for _ in range(100):
            await call(body, timeout=30)
        samples: list[float] = []
        stop = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                await call(body, timeout=30)
                samples.append(time.perf_counter() - started)

        await asyncio.gather(*(caller() for _ in range(in_flight)))
    return samples


def _measure(
    pid: int, address: str, method: str, body: bytes, in_flight: int, seconds: float
) -> dict[str, float]:
    cpu = _cpu_seconds(pid)
    started = time.perf_counter()
    samples = asyncio.run(_drive(address, method, body, in_flight, seconds))
    elapsed = time.perf_counter() - started
    cpu = _cpu_seconds(pid) - cpu
    samples.sort()
    calls = len(samples) + 100  # with the warm-up calls, for CPU per call
    return {
        "p50": samples[len(samples) // 2] * 1e6,
        "p99": samples[int(len(samples) * 0.99)] * 1e6,
        "rps": len(samples) / seconds,
        "cpu_us": cpu / calls * 1e6,
        "elapsed": elapsed,
    }


class MLServer:
    def __init__(self, executable: Path, model_file: Path, workdir: Path, workers: int) -> None:
        self.port = _free_port()
        models = workdir / f"mlserver-{workers}"
        (models / "model_1").mkdir(parents=True)
        shutil.copy(model_file, models / "model_1" / model_file.name)
        (models / "settings.json").write_text(
            json.dumps(mlserver_settings(self.port, _free_port(), _free_port(), workers))
        )
        (models / "model_1" / "model-settings.json").write_text(
            json.dumps(model_settings(Path(model_file.name)))
        )
        self.log = open(workdir / f"mlserver-{workers}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(executable), "start", str(models)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=models,
        )  # fmt: skip
        self.address = f"127.0.0.1:{self.port}"
        ready = b"\n\x07model_1"  # ModelReadyRequest(name="model_1")
        deadline = time.monotonic() + 180
        with grpc.insecure_channel(self.address) as channel:
            call = channel.unary_unary(MLSERVER_READY)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"mlserver exited {self.proc.returncode}; see {self.log.name}"
                    )
                try:
                    if call(ready, timeout=1) == b"\x08\x01":  # ready: true
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"mlserver did not become ready; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.mlserver.exists():
        raise SystemExit(f"bench-peers: {args.mlserver} not found; run `make bench-peers`")
    peers_python = args.mlserver.parent / "python"
    with tempfile.TemporaryDirectory(prefix="xylen-bench-peers-") as tmp:
        root = Path(tmp)
        model_dir, rows = build_model(root / "models")
        row = rows[7]
        xylen_body = pb.PredictRequest(
            inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=row.tolist()))]
        ).SerializeToString()
        ml_body = subprocess.run(
            [str(peers_python), "-c", BUILD_REQUEST, ",".join(repr(float(v)) for v in row)],
            capture_output=True, check=True,
        ).stdout  # fmt: skip
        targets: dict[str, tuple[int, str, str, bytes, Any]] = {}
        xylen = start_xylen(root / "models", {"FEEDBACK_DATA_DIR": str(root / "data")})
        targets["xylen Predict (unary)"] = (
            xylen.proc.pid,
            f"127.0.0.1:{xylen.port}",
            XYLEN_PREDICT,
            xylen_body,
            xylen,
        )
        try:
            for workers in args.workers:
                server = MLServer(args.mlserver, model_dir / "lightgbm_model.txt", root, workers)
                targets[f"MLServer 1.7 LightGBM, parallel_workers={workers}"] = (
                    server.proc.pid, server.address, MLSERVER_INFER, ml_body, server,
                )  # fmt: skip
            # Same answer from both (the check that the comparison is like for like).
            with grpc.insecure_channel(targets["xylen Predict (unary)"][1]) as channel:
                reply = pb.PredictResponse.FromString(
                    channel.unary_unary(XYLEN_PREDICT)(xylen_body)
                )
            for name, (_, address, method, body, _) in targets.items():
                if method != MLSERVER_INFER:
                    continue
                with grpc.insecure_channel(address) as channel:
                    raw = channel.unary_unary(method)(body)
                theirs = float(subprocess.run(
                    [str(peers_python), "-c", READ_RESPONSE], input=raw, capture_output=True, check=True,
                ).stdout)  # fmt: skip
                our_p = (
                    reply.predictions[0].raw_probability_up or reply.predictions[0].probability_up
                )
                print(f"  {name}: P(up) {theirs:.6f}, xylen {our_p:.6f}")
            results: dict[tuple[str, int], dict[str, float]] = {}
            print(
                f"== batch 1, medians of {args.rounds} rounds of {args.seconds:.0f}s per target and level =="
            )
            print(
                f"  {'target':<44} {'in flight':>9} {'p50 us':>8} {'p99 us':>8} {'calls/s':>8} {'server CPU/call us':>19}"
            )
            for level in args.levels:
                per_round: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
                for _ in range(args.rounds):
                    for name, (pid, address, method, body, _) in targets.items():
                        per_round[name].append(
                            _measure(pid, address, method, body, level, args.seconds)
                        )
                for name, measured in per_round.items():
                    med = {k: statistics.median(m[k] for m in measured) for k in measured[0]}
                    results[(name, level)] = med
                    print(
                        f"  {name:<44} {level:>9} {med['p50']:8.0f} {med['p99']:8.0f} "
                        f"{med['rps']:8.0f} {med['cpu_us']:19.0f}"
                    )
            print(
                "== xylen / best MLServer configuration (p50, p99, CPU: lower is better; calls/s: higher) =="
            )
            for level in args.levels:
                ours = results[("xylen Predict (unary)", level)]
                peers = [
                    v for (n, lv), v in results.items() if lv == level and n.startswith("MLServer")
                ]
                best = max(peers, key=lambda m: m["rps"])
                print(
                    f"  {level:>2} in flight: p50 {ours['p50'] / best['p50']:.2f}x  p99 "
                    f"{ours['p99'] / best['p99']:.2f}x  calls/s {ours['rps'] / best['rps']:.2f}x  "
                    f"CPU per call {ours['cpu_us'] / best['cpu_us']:.2f}x"
                )
        finally:
            for *_, server in targets.values():
                server.stop()


if __name__ == "__main__":
    main()
