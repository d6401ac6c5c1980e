"""``python -m backtest`` (``make backtest``, ``xylen-coordinator replay``): the walk-forward
replay of the whole stack over historical candles, judged in trading terms net of fees.

    python -m backtest [--data data/default] [--models models] [--train-data ZIPS] [--out DIR]
                       [--start 2024-09-01] [--bars N] [--passes learning,frozen]
                       [--retrain-every 1000] [--retrain-min-samples 100]

Which bars: by default those the models never saw. When the candles overlap the models' own
training data (``metadata.json`` ``data``), the replay starts where the training configuration's
test period starts (``train_fraction`` + ``validation_fraction`` of the span and a gap of
horizon + lookback bars); otherwise at the first bar with ``lookback`` candles. ``--train-data``
trains the four models on those candles first (into ``<out>/models``) and replays ``--data``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from backtest import report as reporting
from backtest.replay import PassResult, WindowFn, run_pass
from xylen_server.candles import window_input

NAMES = ("model_1", "model_2", "model_3", "model_4")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/default"), help="kline CSV/zip/folder")
    p.add_argument("--models", type=Path, default=Path("models"), help="trained models")
    p.add_argument("--train-data", type=Path, default=None, help="train the models on this first")
    p.add_argument("--out", type=Path, default=None, help="report folder (run/backtest/<data>)")
    p.add_argument("--start", default=None, help="first decision date (YYYY-MM-DD)")
    p.add_argument("--bars", type=int, default=0, help="at most this many decisions (0: all)")
    p.add_argument("--passes", default="learning,frozen", help="learning, frozen or both")
    p.add_argument("--retrain-every", type=int, default=1000, help="RETRAIN_TRIGGER_NEW_SAMPLES")
    p.add_argument("--retrain-min-samples", type=int, default=100, help="RETRAIN_MIN_SAMPLES")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def load(data: Path) -> tuple[dict[str, np.ndarray], int]:
    """Candles (through the training loader) and the interval in ms."""
    from training.features import candles_from_frame
    from training.klines import interval_ms, load_klines

    klines = load_klines(data)
    return candles_from_frame(klines.frame), interval_ms(klines.interval)


def default_bars(
    candles: Mapping[str, np.ndarray], step_ms: int, models: Path, start: str | None
) -> range:
    """Decision bars: from ``start`` (or past the models' training and validation data) to the
    last bar whose every model's horizon still has a close in the data."""
    from training.config import load_config
    from training.metadata import ModelMetadata
    from training.split import date_ms, fraction_split

    metas = [ModelMetadata.read(models / name) for name in NAMES]
    lookback = max(m.lookback for m in metas)
    horizon = max(m.horizon for m in metas)
    open_time = np.asarray(candles["open_time"], dtype=np.int64)
    first = lookback - 1
    if start:
        first = max(first, int(np.searchsorted(open_time, date_ms(start))))
    else:
        data = metas[0].data if isinstance(metas[0].data, dict) else {}
        trained_end = data.get("end")
        if trained_end and str(trained_end) > _iso(int(open_time[0])):
            config = load_config(environ={})
            split = fraction_split(
                open_time,
                np.ones(len(open_time), dtype=bool),
                train_fraction=config.train_fraction,
                validation_fraction=config.validation_fraction,
                step_ms=step_ms,
                gap_bars=config.gap_bars or horizon + lookback,
            )
            first = max(first, int(np.searchsorted(open_time, split.bounds["test"][0])))
    last = len(open_time) - 1 - horizon
    if last < first:
        raise SystemExit(f"backtest: no decision bar left ({len(open_time)} candles)")
    return range(first, last + 1)


def _iso(ms: int) -> str:
    from training.split import iso_ms

    return iso_ms(ms)


def train(data: Path, out: Path) -> Path:
    """The four default models trained on ``data`` (once; kept in ``<out>/models-<data>``)."""
    models = out / f"models-{data.stem}"
    if all((models / n / "metadata.json").exists() for n in NAMES):
        return models
    cmd = [
        sys.executable,
        "-m",
        "training",
        "train",
        "--data",
        str(data),
        "--models-dir",
        str(models),
    ]
    subprocess.run(cmd, check=True)
    return models


def run(
    data: Path,
    models: Path,
    out: Path,
    *,
    start: str | None = None,
    bars: int = 0,
    passes: tuple[str, ...] = ("learning", "frozen"),
    retrain_every: int = 1000,
    retrain_min_samples: int = 100,
    window_fn: WindowFn = window_input,
    progress: bool = True,
    candles: dict[str, np.ndarray] | None = None,
    step_ms: int = 0,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path]]:
    """Replay, then write the report; (report, timings, paths)."""
    if candles is None:
        candles, step_ms = load(data)
    chosen = default_bars(candles, step_ms, models, start)
    if bars:
        chosen = chosen[:bars]
    env = {
        "RETRAIN_TRIGGER_NEW_SAMPLES": str(retrain_every),
        "RETRAIN_MIN_SAMPLES": str(retrain_min_samples),
    }
    results: list[PassResult] = []
    for name in passes:
        results.append(
            run_pass(
                name,
                candles,
                chosen,
                models,
                out / "run",
                step_ms,
                learning=name == "learning",
                server_env=env,
                window_fn=window_fn,
                progress=sys.stderr if progress else None,
            )
        )
    from training.metadata import ModelMetadata

    fee = ModelMetadata.read(models / NAMES[0]).fee
    settings = {
        "data": str(data),
        "passes": list(passes),
        "retrain_every": retrain_every,
        "retrain_min_samples": retrain_min_samples,
        "fee": fee,
        "weights": "model_1 0.4, model_2 0.3, model_3 0.2, model_4 0.1",
    }
    built = reporting.build(results, candles, chosen, step_ms, settings)
    timing = reporting.timings(results)
    paths = reporting.write(built, timing, out)
    return built, timing, paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or Path("run/backtest") / args.data.stem
    models = train(args.train_data, out) if args.train_data else args.models
    passes = tuple(p.strip() for p in args.passes.split(",") if p.strip())
    if not passes or any(p not in ("learning", "frozen") for p in passes):
        print("backtest: --passes takes learning, frozen or both", file=sys.stderr)
        return 2
    _built, _timing, paths = run(
        args.data,
        models,
        out,
        start=args.start,
        bars=args.bars,
        passes=passes,
        retrain_every=args.retrain_every,
        retrain_min_samples=args.retrain_min_samples,
        progress=not args.quiet,
    )
    print(paths["markdown"].read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
