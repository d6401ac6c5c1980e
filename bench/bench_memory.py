"""Server memory: RSS idle and after rounds of load, per model type, and under the seed's
container limits.

For LightGBM, XGBoost and CatBoost in turn a server process serves a small model; RSS is read
from /proc after 50 single-row Predicts and the prediction log's first Parquet flush (idle:
what a server that has answered anything holds), and after each of ``--rounds`` rounds of
``--rows`` predictions (batches of 100 and single rows) and 100 Feedback calls, so the last
rounds show whether it levels off once the prediction log reaches its cap
(``PREDICTION_LOG_MAX_ROWS``, default 200,000: the fourth round of 60,000 passes it, and the
default seven rounds give four at the cap, whose spread the line prints). Each figure is
VmRSS with its anonymous part (what the process allocated) and its file part (shared library
pages, which the kernel can drop and read again under pressure), against the seed's 256 MiB
line. ``--baseline DIR`` runs another checkout's server (e.g. main) the same way in the same
run, before this one, for a before/after. Then, where a cgroup can be made (root, writable
/sys/fs/cgroup), a server of each of ``--cgroup-types`` in 256 MiB and half a CPU takes the
same load: the peak the kernel charged and whether anything was OOM-killed.

    python -m bench memory                       # ~4-6 minutes
    python -m bench.bench_memory --baseline /work/main --cgroup-types lightgbm,xgboost,catboost
    python -m bench.bench_memory --types lightgbm --env MALLOC_ARENA_MAX=8   # one setting
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from bench.bench_server import REPO
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2
from xylen_server.devtools import launcher
from xylen_server.devtools.limits import limited
from xylen_server.settings import Settings

TYPES = ("lightgbm", "xgboost", "catboost")
LIMIT = 256 * 1024 * 1024
LOG_CAP_ROWS = int(
    {f.name: f for f in dataclasses.fields(Settings)}["prediction_log_max_rows"].default  # type: ignore[arg-type]
)
"""The in-memory prediction log's default cap: RSS should stop growing once it is reached."""
IDLE_WAIT_SECONDS = 6.0
"""After the 50 idle rows: past ``PREDICTION_LOG_FLUSH_INTERVAL_SECONDS`` (5), so idle
includes what the first flush loads."""


@dataclass(frozen=True)
class Rss:
    """One /proc/<pid>/status reading, MiB."""

    total: float
    anon: float
    file: float

    def __str__(self) -> str:
        return f"{self.total:4.0f} ({self.anon:3.0f}+{self.file:3.0f})"


def rss(pid: int) -> Rss:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) / 1024
    return Rss(fields["VmRSS"], fields["RssAnon"], fields["RssFile"] + fields.get("RssShmem", 0.0))


def rss_mib(pid: int) -> float:
    return rss(pid).total


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(stub: pb_grpc.ModelServiceStub, rows: np.ndarray, count: int) -> tuple[int, int]:
    """``count`` predictions: batches of 100 and, one call in ten, 10 single rows; then the
    outcomes of the last 100 single rows as Feedback. Returns (predictions, calls)."""
    batch, one = _request(rows[:100]), _request(rows[:1])
    done = calls = 0
    i = 0
    singles: list[str] = []
    while done < count:
        done += len(stub.Predict(batch, timeout=60).predictions)
        calls += 1
        if i % 10 == 0:
            for _ in range(10):
                answer = stub.Predict(one, timeout=60).predictions
                done += len(answer)
                calls += 1
                singles.append(answer[0].prediction_id)
        i += 1
    outcome = pb.TradeOutcome(pnl=1.0, realized_return=0.01, side=pb.TRADE_SIDE_LONG)
    outcome.close_time.GetCurrentTime()
    for prediction_id in singles[-100:]:
        stub.Feedback(pb.FeedbackRequest(prediction_id=prediction_id, outcome=outcome), timeout=60)
        calls += 1
    return done, calls


def measure(
    model_dir: Path,
    data: Path,
    rows: np.ndarray,
    rounds: int,
    per_round: int,
    source: Path,
    preexec: Callable[[], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Rss, list[Rss], int, float]:
    """(idle RSS, RSS after each round, answers, server CPU us per call during the rounds) of
    a server on ``model_dir``."""
    server = launcher.start_server(
        model_dir,
        env={"FEEDBACK_DATA_DIR": str(data), "LOG_LEVEL": "WARNING", **(env or {})},
        cwd=source,
        preexec=preexec,
    )
    answered = calls = 0
    cpu = 0.0
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            for _ in range(50):
                stub.Predict(_request(rows[:1]), timeout=60)
            time.sleep(IDLE_WAIT_SECONDS)  # the prediction log's first flush
            idle = rss(server.proc.pid)
            after = []
            for _ in range(rounds):
                started = cpu_seconds(server.proc.pid)
                predicted, made = _load(stub, rows, per_round)
                cpu += cpu_seconds(server.proc.pid) - started
                answered += predicted
                calls += made
                time.sleep(1)
                after.append(rss(server.proc.pid))
    finally:
        server.stop()
    return idle, after, answered, 1e6 * cpu / max(calls, 1)


def level_off(after: list[Rss], per_round: int) -> str:
    """How flat RSS stays over the rounds after the prediction log reached its cap (the round
    whose answers pass :data:`LOG_CAP_ROWS`, about one answer per row): its range and spread."""
    first = math.ceil(LOG_CAP_ROWS / per_round)  # 1-based round that reaches the cap
    capped = [v.total for v in after[first - 1 :]]
    if len(capped) < 2:
        return f"too few rounds past the log's cap (round {first}) to see it level off"
    low, high = min(capped), max(capped)
    return (
        f"at the log's cap (rounds {first}-{len(after)}) {low:.0f}-{high:.0f}, "
        f"spread {high - low:.0f} MiB"
    )


def _line(
    label: str, idle: Rss, after: list[Rss], answered: int, cpu_us: float, per_round: int
) -> str:
    rounds = "  ".join(str(v) for v in after)
    peak = max(v.total for v in after)
    verdict = "below" if peak < LIMIT / 2**20 else "OVER"
    return (
        f"  {label:<9} idle {idle}   rounds {rounds}   {level_off(after, per_round)}; "
        f"highest {peak:.0f}: {verdict} the 256 MiB line ({answered:,} answers, server CPU "
        f"{cpu_us:.0f} us a call)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_memory")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", type=int, default=60_000, help="predictions per round")
    parser.add_argument("--source", type=Path, default=REPO, help="checkout whose server runs")
    parser.add_argument("--baseline", type=Path, help="another checkout, measured first")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--cgroup-types", default="lightgbm", help="'' skips the cgroup runs")
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the servers (repeatable)"
    )
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    sources = [("baseline", args.baseline)] if args.baseline else []
    sources.append(("this", args.source))
    with tempfile.TemporaryDirectory(prefix="xylen-bench-memory-") as tmp:
        root = Path(tmp)
        rows = _models(root)
        print(
            f"== server RSS MiB: total (anonymous+file), idle after 50 rows and a flush, then "
            f"after each round of {args.rows:,} predictions and 100 Feedback =="
        )
        for label, source in sources:
            print(f"  -- {label}: server from {source}{'; env ' + str(env) if env else ''}")
            for model_type in args.types.split(","):
                idle, after, answered, cpu_us = measure(
                    root / model_type,
                    root / f"data-{label}-{model_type}",
                    rows,
                    args.rounds,
                    args.rows,
                    source,
                    env=env,
                )
                print(_line(model_type, idle, after, answered, cpu_us, args.rows), flush=True)
        for model_type in filter(None, args.cgroup_types.split(",")):
            _in_cgroup(root, model_type, rows, args, env)


def _in_cgroup(
    root: Path, model_type: str, rows: np.ndarray, args: argparse.Namespace, env: dict[str, str]
) -> None:
    with limited(LIMIT) as cgroup:
        if cgroup is None:
            print("  (no cgroup can be made here: the 256 MiB runs are skipped)")
            return
        print(f"== {model_type} server in a cgroup: 256 MiB, 0.5 CPU (the seed's limits) ==")
        figures = ""
        try:
            idle, after, answered, _ = measure(
                root / model_type,
                root / f"data-cgroup-{model_type}",
                rows,
                args.rounds,
                args.rows,
                args.source,
                preexec=cgroup.join,
                env=env,
            )
            outcome = f"{answered:,} answers, kept answering"
            figures = (
                f"; RSS idle {idle}, rounds {'  '.join(str(v) for v in after)}; "
                f"{level_off(after, args.rows)}"
            )
        except (grpc.RpcError, RuntimeError) as exc:
            outcome = f"STOPPED answering: {str(exc).splitlines()[0][:100]}"
        print(
            f"  {outcome}; OOM kills {cgroup.oom_kills()}; cgroup peak "
            f"{cgroup.peak_bytes() / 2**20:.0f} MiB of 256 (RSS and page cache, the parity "
            f"child's too){figures}",
            flush=True,
        )


if __name__ == "__main__":
    main()
