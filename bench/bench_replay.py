"""Walk-forward replay benchmark: bars per second through the whole stack (four server
processes and the coordinator on loopback, simulated clock, Feedback after every bar, the
retrains its triggers start) and where the time goes.

By default a year of hourly bars of the offline dataset (8,760 decisions from 2024-01-01, the
learning pass: the one with Feedback and retrains; the models of ``make train``, which saw part
of that year, so the trading figures here mean nothing, only the speed does). ``--bars N``
replays fewer and extrapolates to a year, saying so.

Where the time goes, side by side in this run:

* wall seconds of the replay's phases: Predict round trips (of which inside the coordinator, of
  which the slowest server's round trip), Feedback with the wait for every delivery, the
  retrain checks, waiting for retrains, the replay's own work, start-up;
* CPU seconds of each process over the bars (/proc; a server's includes its retrain jobs),
  which a loaded machine does not inflate the way it inflates wall time;
* features and inference of one bar measured alone in this process with the servers' code
  (training's ``window_features`` on a window; one ONNX Runtime session per model on one row),
  so the Predict round trip splits into features, inference and the rest (gRPC, the
  coordinator's fan-out and bookkeeping).

``python -m bench replay`` (``BENCH_REPLAY_BARS=N`` for fewer bars) or
``python -m bench.bench_replay [--bars N]`` runs it alone (a year: about 15-30 minutes on a loaded
2-core machine, most of it Feedback and retrains); ``bench.__main__`` calls :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from backtest.__main__ import load, run

REPO = Path(__file__).resolve().parents[1]
YEAR_BARS = 8760


def features_and_inference(
    candles: dict[str, np.ndarray], models: Path, bars: range, samples: int = 300
) -> tuple[float, float]:
    """Seconds per bar: computing one window's features once (what each server does), and one
    row through each of the four models' ONNX sessions (summed)."""
    import onnxruntime as ort

    from training import features
    from training.metadata import ModelMetadata

    meta = ModelMetadata.read(models / "model_1")
    lookback = meta.lookback
    picks = list(bars)[:: max(1, len(bars) // samples)][:samples]
    windows = [
        {k: np.asarray(v)[b - lookback + 1 : b + 1] for k, v in candles.items()} for b in picks
    ]
    started = time.perf_counter()
    rows = [features.window_features(w) for w in windows]
    per_features = (time.perf_counter() - started) / len(windows)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = []
    for name in ("model_1", "model_2", "model_3", "model_4"):
        session = ort.InferenceSession(
            str(models / name / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        sessions.append((session, session.get_inputs()[0].name))
    started = time.perf_counter()
    for row in rows:
        x = np.asarray(row, dtype=np.float32).reshape(1, -1)
        for session, input_name in sessions:
            session.run(None, {input_name: x})
    per_inference = (time.perf_counter() - started) / len(rows)
    return per_features, per_inference


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench replay")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "default")
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--start", default="2024-01-01")
    parser.add_argument(
        "--bars", type=int, default=int(os.environ.get("BENCH_REPLAY_BARS", YEAR_BARS))
    )
    args, _ = parser.parse_known_args()
    if not (args.models / "model_4" / "metadata.json").exists():
        raise SystemExit(f"bench replay: no models in {args.models}; run make train first")
    candles, step_ms = load(args.data)
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        report, timing, _ = run(
            args.data,
            args.models,
            Path(tmp),
            start=args.start,
            bars=args.bars,
            passes=("learning",),
            progress=True,
            candles=candles,
            step_ms=step_ms,
        )
    t = timing["learning"]
    bars = t["bars"]
    loop = t["total"] - t["startup"]
    first = int(np.searchsorted(candles["open_time"], report["bars"]["first_open_time"]))
    per_features, per_inference = features_and_inference(
        candles, args.models, range(first, first + bars)
    )
    retrains = report["passes"]["learning"]["retrains"]
    print(
        f"replay: {bars} bars (learning pass) in {loop:.1f} s after a {t['startup']:.1f} s "
        f"start-up: {bars / loop:.1f} bars/s; {len(retrains)} retrains "
        f"({sum(e['state'] == 'promoted' for e in retrains)} promoted)"
    )
    if bars < YEAR_BARS:
        print(
            f"replay: a year ({YEAR_BARS} bars) extrapolated from these {bars}: "
            f"{YEAR_BARS / bars * loop / 60:.1f} min (retrains scale with the bars too)"
        )
    print("replay: wall time per bar (ms) and share of the loop:")
    for key, label in (
        ("predict", "Predict round trip"),
        ("coordinator", "  of which inside the coordinator"),
        ("votes", "  of which the slowest server's round trip"),
        ("feedback", "Feedback + delivery to every server"),
        ("retrain_checks", "retrain checks (GetModelInfo)"),
        ("retraining", "retraining (train, gate, swap)"),
        ("local", "replay's own work"),
    ):
        print(f"  {label:45s} {1000 * t[key] / bars:8.2f} ms  {100 * t[key] / loop:5.1f}%")
    print(
        f"  {'features of one window, measured alone':45s} {1000 * per_features:8.2f} ms "
        "(each server computes it)"
    )
    print(f"  {'inference, four models, one row each':45s} {1000 * per_inference:8.2f} ms")
    rest = t["predict"] / bars - per_features - per_inference / 4
    print(
        f"  {'Predict beyond features + one inference':45s} {1000 * rest:8.2f} ms "
        "(gRPC, fan-out, coordinator)"
    )
    cpu = t["cpu_seconds"]
    total_cpu = sum(cpu.values())
    print("replay: CPU seconds over the bars (share of all processes):")
    for name, seconds in cpu.items():
        print(
            f"  {name:12s} {seconds:8.1f} s  {100 * seconds / total_cpu if total_cpu else 0:5.1f}%"
            f"  {1000 * seconds / bars:6.2f} ms/bar"
        )


if __name__ == "__main__":
    main()
