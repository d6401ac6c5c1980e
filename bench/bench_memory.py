"""Server memory: RSS idle and after rounds of load, per model type, and under the seed's
container limits.

For LightGBM, XGBoost and CatBoost in turn a server process serves a small model; RSS is read
from /proc after 50 single-row Predicts (idle) and after each of ``--rounds`` rounds of
``--rows`` predictions (batches of 100 and single rows), so the last rounds show whether it
levels off once the prediction log reaches its cap (``PREDICTION_LOG_MAX_ROWS``, default
200,000: five rounds of 60,000 pass it). Then, where a cgroup can be made (root, writable
/sys/fs/cgroup), a LightGBM server in 256 MiB and half a CPU takes the same load: the peak the
kernel charged and whether anything was OOM-killed.

    python -m bench memory                       # ~2-4 minutes
    python -m bench.bench_memory --source /path  # the same against another checkout's server
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np

from bench.bench_server import REPO
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2
from xylen_server.devtools import launcher
from xylen_server.devtools.limits import limited

TYPES = ("lightgbm", "xgboost", "catboost")
LIMIT = 256 * 1024 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _models(root: Path) -> np.ndarray:
    sys.path.insert(0, str(REPO / "tests"))
    from harness import synthetic_candles, training_rows, write_model

    candles = synthetic_candles()
    for model_type in TYPES:
        write_model(root / model_type, "model_1", model_type, candles, trees=200)
    rows, _ = training_rows(candles)
    return rows


def _request(rows: np.ndarray) -> pb.PredictRequest:
    return pb.PredictRequest(
        inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=r.tolist())) for r in rows]
    )


def _load(stub: pb_grpc.ModelServiceStub, rows: np.ndarray, count: int) -> int:
    """``count`` predictions: batches of 100 and, one call in ten, 10 single rows."""
    batch, one = _request(rows[:100]), _request(rows[:1])
    done = 0
    i = 0
    while done < count:
        done += len(stub.Predict(batch, timeout=60).predictions)
        if i % 10 == 0:
            for _ in range(10):
                done += len(stub.Predict(one, timeout=60).predictions)
        i += 1
    return done


def measure(
    model_dir: Path,
    data: Path,
    rows: np.ndarray,
    rounds: int,
    per_round: int,
    source: Path,
    preexec: Callable[[], None] | None = None,
    sample: Callable[[int], float] = rss_mib,
) -> tuple[float, list[float], int]:
    """(idle RSS, RSS after each round, answers) of a server on ``model_dir``."""
    server = launcher.start_server(
        model_dir,
        env={"FEEDBACK_DATA_DIR": str(data), "LOG_LEVEL": "WARNING"},
        cwd=source,
        preexec=preexec,
    )
    answered = 0
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            for _ in range(50):
                stub.Predict(_request(rows[:1]), timeout=60)
            time.sleep(1)
            idle = sample(server.proc.pid)
            after = []
            for _ in range(rounds):
                answered += _load(stub, rows, per_round)
                time.sleep(1)
                after.append(sample(server.proc.pid))
    finally:
        server.stop()
    return idle, after, answered


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_memory")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=60_000, help="predictions per round")
    parser.add_argument("--source", type=Path, default=REPO, help="checkout whose server runs")
    parser.add_argument("--types", default=",".join(TYPES))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xylen-bench-memory-") as tmp:
        root = Path(tmp)
        rows = _models(root)
        print(
            f"== server RSS (MiB), idle after 50 rows, then after each round of "
            f"{args.rows:,} predictions (server from {args.source}) =="
        )
        for model_type in args.types.split(","):
            idle, after, answered = measure(
                root / model_type,
                root / f"data-{model_type}",
                rows,
                args.rounds,
                args.rows,
                args.source,
            )
            rounds = "  ".join(f"{v:5.0f}" for v in after)
            growth = after[-1] - after[-2] if len(after) > 1 else float("nan")
            print(
                f"  {model_type:<9} idle {idle:5.0f}   rounds {rounds}   "
                f"last round {growth:+.0f} MiB   ({answered:,} answers)"
            )
        with limited(LIMIT) as cgroup:
            if cgroup is None:
                print("  (no cgroup can be made here: the 256 MiB run is skipped)")
                return
            print("== LightGBM server in a cgroup: 256 MiB, 0.5 CPU (the seed's limits) ==")
            try:
                idle, after, answered = measure(
                    root / "lightgbm",
                    root / "data-cgroup",
                    rows,
                    args.rounds,
                    args.rows,
                    args.source,
                    preexec=cgroup.join,
                )
                outcome = f"{answered:,} answers, kept answering"
            except (grpc.RpcError, RuntimeError) as exc:
                idle, after = float("nan"), []
                outcome = f"STOPPED answering: {str(exc).splitlines()[0][:100]}"
            print(
                f"  {outcome}; OOM kills {cgroup.oom_kills()}; cgroup peak "
                f"{cgroup.peak_bytes() / 2**20:.0f} MiB of 256 (RSS and page cache); RSS idle "
                f"{idle:.0f}, rounds {' '.join(f'{v:.0f}' for v in after)}"
            )


if __name__ == "__main__":
    main()
