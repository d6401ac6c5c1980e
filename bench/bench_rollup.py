"""Prediction-log rollup benchmark: how many part files a log leaves, and what merging an hour
costs the flusher.

A log on a simulated clock (a clock file, as ``CLOCK_FILE`` replays use) is fed a Predict batch
and flushed every simulated 5 s (the default flush interval under steady traffic), fsync off,
for ``--hours`` hours; the flusher's rollup is called after each flush, as the flusher does.
Side by side in this run, without the rollup (``PREDICTION_LOG_ROLLUP_SECONDS=0``) and with it
(3600): part files and ``_parts.index`` lines left; CPU of the flushes and of the merges (the
calling thread's, ``RUSAGE_THREAD``: a loaded machine does not inflate it the way it inflates
wall time); then one hour at the cap (720 parts of 970 rows, ~700,000 rows) merged alone.

``python -m bench rollup`` or ``python -m bench.bench_rollup [--hours N]`` runs it alone
(about a minute at the default 6 hours); ``bench.__main__`` calls :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xylen_server import clock
from xylen_server.learning.prediction_log import INDEX_FILE, PredictionLog

START = 1_800_000_000_000  # a whole hour
STEP_MS = 5000
ROUNDS = 4


def _thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def _run(root: Path, rollup: int, flushes: int, rows: int) -> dict[str, float]:
    root.mkdir(parents=True, exist_ok=True)
    directory = root / f"log-{rollup}-{rows}"
    clock_path = root / f"clock-{rollup}-{rows}"
    clock.write(clock_path, START)
    clock.use_file(clock_path)
    log = PredictionLog(
        directory, flush_interval_seconds=3600, max_rows=1000, fsync=False, rollup_seconds=rollup
    )
    features = np.random.default_rng(0).standard_normal((rows, 25)).astype(np.float32)
    counter = 0
    flush_cpu = merge_cpu = worst = 0.0
    merges = 0
    try:
        for k in range(flushes):
            clock.write(clock_path, START + k * STEP_MS)
            ids = [f"0123456789ab-{counter + i:x}" for i in range(rows)]
            counter += rows
            log.record(ids, features, np.full(rows, 0.5), np.full(rows, 3, np.int8), "m", 1)
            started = _thread_cpu()
            log.flush()
            flush_cpu += _thread_cpu() - started
            started = _thread_cpu()
            merged = log.roll_up()
            took = _thread_cpu() - started
            merge_cpu += took
            if merged is not None:
                merges += 1
                worst = max(worst, took)
        parts = len(log.part_files())
        files = len(os.listdir(directory))
        with open(directory / INDEX_FILE, encoding="utf-8") as index:
            lines = sum(1 for _ in index)
    finally:
        log.close()
        clock.use_file(None)
    return {
        "parts": parts, "files": files, "lines": lines, "rows": counter, "flush": flush_cpu,
        "merge": merge_cpu, "merges": merges, "worst": worst,
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Run the measurements and print labelled figures."""
    parser = argparse.ArgumentParser(prog="bench.bench_rollup")
    parser.add_argument("--hours", type=float, default=6.0, help="simulated hours of parts")
    parser.add_argument("--rows", type=int, default=70, help="rows a part (70: ~50,000 an hour)")
    args = parser.parse_args(argv)
    flushes = int(args.hours * 3600_000 / STEP_MS)
    with tempfile.TemporaryDirectory(prefix="xylen-bench-rollup-") as tmp:
        root = Path(tmp)
        print(
            f"== prediction-log rollup: {args.hours:g} simulated hours, a part every 5 s of "
            f"{args.rows} rows ({args.rows * 720:,} rows an hour), fsync off, {root}"
        )
        _run(root / "warm-up", 3600, 50, args.rows)  # first-call costs out of the figures
        flush: dict[int, list[float]] = {0: [], 3600: []}
        for round_ in range(ROUNDS):  # in turn, so machine noise hits both alike
            for rollup in (0, 3600) if round_ % 2 == 0 else (3600, 0):
                r = _run(root / f"round-{round_}", rollup, flushes, args.rows)
                flush[rollup].append(r["flush"] / flushes * 1e3)
                if round_ == 0:
                    print(
                        f"  rollup {rollup:>4} s: {r['parts']:7,.0f} parts, {r['files']:7,.0f} "
                        f"files, {r['lines']:7,.0f} index lines, {r['rows']:,.0f} rows; merges "
                        f"{r['merges']:.0f}, {r['merge']:.2f} s of CPU in all, the costliest "
                        f"{r['worst'] * 1e3:.0f} ms"
                    )
        off, on = float(np.median(flush[0])), float(np.median(flush[3600]))
        print(
            f"  flush CPU, median of {ROUNDS} rounds: {off:.3f} ms a flush without, {on:.3f} ms "
            f"with ({on / off:.2f}x; rounds: {', '.join(f'{v:.3f}' for v in flush[0])} / "
            f"{', '.join(f'{v:.3f}' for v in flush[3600])})"
        )
        cap = _run(root, 3600, 720 + 13, 970)  # the hour, then 65 s: it is merged
        print(
            f"  an hour at the cap ({720 * 970:,} rows in 720 parts): merged in "
            f"{cap['worst'] * 1e3:.0f} ms of CPU"
        )


if __name__ == "__main__":
    main()
