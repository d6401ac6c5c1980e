"""Training on Dask against training in one process, on the same data: wall time, CPU time and
peak memory, end to end (read + featurise + label + split + fit + calibrate + ONNX + parity).

Data: generated 1m candles, 3 months (~130k rows) and a year (~525k rows), one monthly file
per partition. Single process: ``training.pipeline.train_models`` (``num_threads=2``).
Dask: ``training.dask_train.train_models_dask`` on a LocalCluster of two single-threaded
worker processes on loopback (the same two cores). Each run is its own subprocess; peak memory
is ``ru_maxrss`` of that process (client and scheduler) plus each worker process's own, read on
the worker before the cluster closes (Dask: the sum over processes; the largest single process
is what has to fit one machine's or one worker's memory). CPU time likewise sums every process.

``python -m bench dask`` (or ``python -m bench.bench_dask``) runs it alone; its runs take about
185 CPU-seconds, about 4 minutes on a quiet 2-core machine (20 minutes under a load of 22).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

YEAR = ("2024-01", "2024-12")
PARAMS = {"n_estimators": 200, "early_stopping_rounds": 20}
RUNS = (("lightgbm", 3), ("lightgbm", 12), ("xgboost", 12))
MODEL = {"lightgbm": "model_1", "xgboost": "model_2"}


def _usage() -> tuple[float, float]:
    """(peak RSS MB, CPU seconds) of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_maxrss / 1024, r.ru_utime + r.ru_stime


def _child(mode: str, data: str, model_type: str, out: str) -> dict[str, Any]:
    import lightgbm  # noqa: F401  library import time is not training time
    import xgboost  # noqa: F401

    from training.config import load_config

    overrides: dict[str, Any] = {"data": data, "models_dir": out}
    for key, value in PARAMS.items():
        overrides[f"params.{model_type}.{key}"] = value
    config = load_config(None, overrides)
    name = MODEL[model_type]
    if mode == "single":
        from training.pipeline import train_models

        start = time.perf_counter()
        (meta,) = train_models(config, [name], Path(out))
        seconds = time.perf_counter() - start
        peak, cpu = _usage()
        return {"seconds": seconds, "peak_mb": [peak], "cpu_s": cpu, "rows": meta.training_samples, "trees": meta.metrics["best_iteration"]}  # fmt: skip

    from training.dask_train import dask_client, train_model_dask

    started = time.perf_counter()
    with dask_client("local") as client:
        ready = time.perf_counter() - started
        start = time.perf_counter()
        meta = train_model_dask(client, config.model(name), config, Path(out))
        seconds = time.perf_counter() - start
        workers = client.run(_usage)
    peak, cpu = _usage()
    return {
        "seconds": seconds,
        "startup_s": ready,
        "peak_mb": [peak, *(w[0] for w in workers.values())],
        "cpu_s": cpu + sum(w[1] for w in workers.values()),
        "rows": meta.training_samples,
        "trees": meta.metrics["best_iteration"],
    }


def _run(mode: str, data: Path, model_type: str, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_dask", "--child", mode, str(data), model_type, str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench dask {mode} {model_type} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> None:
    from training.generator import generate

    parser = argparse.ArgumentParser(prog="bench.bench_dask")
    parser.add_argument(
        "--months",
        type=int,
        choices=range(1, 13),
        default=12,
        help="of candles, from 2024-01 (the short runs take a quarter of them, at least one)",
    )
    args = parser.parse_args(argv)
    span = {12: args.months, 3: max(1, args.months // 4)}
    with tempfile.TemporaryDirectory(prefix="xylen-bench-dask-") as tmp:
        year = Path(tmp) / "12"
        end = f"{YEAR[0][:5]}{args.months:02d}"
        zips = generate(year, interval="1m", start=YEAR[0], end=end, seed=1)
        quarter = Path(tmp) / "3"
        quarter.mkdir()
        for path in zips[: span[3]]:
            for f in path.parent.glob(path.name + "*"):  # the zip and its .CHECKSUM
                shutil.copy(f, quarter / f.name)
        print("== dask: single process (num_threads=2) vs LocalCluster (2 workers x 1 thread)")
        print(f"  1m candles, one file per month; params {PARAMS}; end to end incl. ONNX + parity")
        results = []
        for model_type, months in RUNS:
            data = year if months == 12 else quarter
            row = {}
            for mode in ("single", "dask"):
                out = Path(tmp) / f"models-{mode}-{model_type}-{months}"
                row[mode] = r = _run(mode, data, model_type, out)
                print(
                    f"  {model_type:<8} {span[months]:>2} months  {mode:<6}  train rows={r['rows']:>7,}  "
                    f"time={r['seconds']:6.1f} s"
                    + (f" (+{r['startup_s']:.1f} s cluster start)" if "startup_s" in r else "")
                    + f"  CPU={r['cpu_s']:6.1f} s  trees={r['trees']:>3}  "
                    f"peak RSS: sum={sum(r['peak_mb']):5.0f} MB largest process="
                    f"{max(r['peak_mb']):5.0f} MB ({len(r['peak_mb'])} processes)",
                    flush=True,
                )
            results.append((model_type, months, row))
        print("  ratios dask/single (time, CPU, summed peak RSS, largest process RSS):")
        for model_type, months, row in results:
            s, d = row["single"], row["dask"]
            print(
                f"  {model_type:<8} {span[months]:>2} months  time x{d['seconds'] / s['seconds']:.2f}  "
                f"CPU x{d['cpu_s'] / s['cpu_s']:.2f}  "
                f"RSS sum x{sum(d['peak_mb']) / sum(s['peak_mb']):.2f}  "
                f"largest x{max(d['peak_mb']) / max(s['peak_mb']):.2f}"
            )


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "--child":
        print(json.dumps(_child(*sys.argv[2:6])))
    else:
        main()
