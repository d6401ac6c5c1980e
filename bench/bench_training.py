"""Training-side benchmark: data path throughput and per-model training time and memory.

* rows/s for load + featurise + label on one year of generated 1m candles (~525k rows);
* fit time and peak RSS per model type on one year of 1h and of 1m candles.

Each measurement runs in its own subprocess so its peak RSS (``ru_maxrss``) is its own.
``python -m bench.bench_training`` runs it alone; ``bench.__main__`` calls :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

YEAR = ("2024-01", "2024-12")
FIT_PARAMS = {"n_estimators": 200, "early_stopping_rounds": 20}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _prepare(data: str) -> tuple[Any, Any, Any, int, float]:
    import numpy as np

    from training import features
    from training.klines import interval_ms, load_klines
    from training.labels import binary_labels

    start = time.perf_counter()
    klines = load_klines(data)
    candles = features.candles_from_frame(klines.frame)
    x = features.compute_features(candles)
    step = interval_ms(klines.interval)
    y = binary_labels(candles["open_time"], candles["close"], horizon=1, step_ms=step, fee=0.001)
    elapsed = time.perf_counter() - start
    usable = np.isfinite(x).all(axis=1) & np.isfinite(y)
    return x, y, usable, klines.frame.height, elapsed


def _child(task: str, data: str, model_type: str | None) -> dict[str, Any]:
    x, y, usable, rows, elapsed = _prepare(data)
    if task == "data":
        return {"rows": rows, "seconds": elapsed, "peak_rss_mb": _peak_rss_mb()}
    import numpy as np

    from training import features
    from training.trainers import make_model

    idx = np.flatnonzero(usable)
    cut = int(len(idx) * 0.8)
    gap = features.LOOKBACK_PERIODS + 1
    train, valid = idx[:cut], idx[cut + gap :]
    model = make_model(str(model_type), FIT_PARAMS, feature_names=list(features.FEATURE_NAMES))
    __import__(str(model_type))  # library import time is not fit time
    start = time.perf_counter()
    model.fit(x[train], y[train], x[valid], y[valid])
    return {
        "rows": len(train),
        "seconds": time.perf_counter() - start,
        "iterations": model.best_iteration,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _run(task: str, data: Path, model_type: str = "") -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_training", "--child", task, str(data), model_type]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> None:
    """Generate the data, run every measurement, print labelled figures."""
    from training.generator import generate
    from training.metadata import MODEL_TYPES

    parser = argparse.ArgumentParser(prog="bench.bench_training")
    parser.add_argument(
        "--months", type=int, choices=range(1, 13), default=12, help="of candles, from 2024-01"
    )
    args = parser.parse_args(argv)
    span = "1 year" if args.months == 12 else f"{args.months} months"
    with tempfile.TemporaryDirectory(prefix="xylen-bench-") as tmp:
        data = {}
        for interval in ("1h", "1m"):
            data[interval] = Path(tmp) / interval
            end = f"{YEAR[0][:5]}{args.months:02d}"
            generate(data[interval], interval=interval, start=YEAR[0], end=end, seed=1)

        print(f"== training: data path (load zips + featurise + label, {span} of 1m candles)")
        r = _run("data", data["1m"])
        print(
            f"  rows={r['rows']:,}  time={r['seconds']:.2f} s  "
            f"throughput={r['rows'] / r['seconds']:,.0f} rows/s  peak RSS={r['peak_rss_mb']:.0f} MB"
        )
        print("== training: fit (80% train / gap / 20% validation, early stopping, 2 threads)")
        print(f"  params: {FIT_PARAMS}")
        for interval in ("1h", "1m"):
            for model_type in MODEL_TYPES:
                r = _run("fit", data[interval], model_type)
                print(
                    f"  {interval} x {span}  {model_type:<9} train rows={r['rows']:>7,}  "
                    f"fit={r['seconds']:6.2f} s  trees={r['iterations']:>4}  "
                    f"peak RSS={r['peak_rss_mb']:5.0f} MB"
                )


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        result = _child(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
        print(json.dumps(result))
    else:
        main()
