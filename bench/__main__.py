"""``make bench``: every benchmark, one after another, printing labelled figures.

``python -m bench [server|training|feedback|coordinator|learning|security|fleet|load|telemetry
dask|workers|replay|swaps|memory|rollup|calls ...]`` runs a subset.
Figures are measured side by side within each section; on shared machines compare the ratios.

``python -m bench --smoke [sections]`` (``make bench-smoke``, which CI runs after the tests)
runs every section end to end on a few seconds of load and small data (:data:`SMOKE`), each in
a process of its own, and exits 1 naming every section that failed. Its figures mean nothing;
it is there so that a change that breaks a section (a store gaining a field its records lack,
two processes sharing a file) fails CI, not the next full run days later.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SECTIONS = {
    "server": "bench.bench_server",
    "training": "bench.bench_training",
    "feedback": "bench.bench_feedback",
    "coordinator": "bench.bench_coordinator",
    "learning": "bench.bench_learning",
    "security": "bench.bench_security",
    "fleet": "bench.bench_fleet",
    "load": "bench.bench_load",
    "telemetry": "bench.bench_telemetry",
    "dask": "bench.bench_dask",
    "workers": "bench.bench_workers",
    "replay": "bench.bench_replay",
    "swaps": "bench.bench_swaps",
    "memory": "bench.bench_memory",
    "rollup": "bench.bench_rollup",
    "calls": "bench.bench_calls",
}


SMOKE: dict[str, tuple[str, dict[str, str]]] = {
    "server": ("--seconds 0.3", {}),
    "training": ("--months 1", {}),
    "feedback": ("--seconds 0.3", {}),
    "coordinator": ("", {"BENCH_CALLS": "60", "BENCH_SECONDS": "0.5"}),
    "learning": ("--seconds 0.5", {}),
    "security": ("--seconds 0.3 --trees 50", {}),
    "fleet": (
        "",
        {
            "BENCH_FLEET_LEVELS": "1,8",
            "BENCH_FLEET_CALLS": "50",
            "BENCH_FLEET_SECONDS": "2",
            "BENCH_HUNG_SECONDS": "1",
        },
    ),
    "load": ("--seconds 0.5", {}),
    "telemetry": ("--seconds 0.3 --trees 50", {}),
    "dask": ("--months 2", {}),
    "workers": (
        "--seconds 1 --calls 2000 --rounds 1 --offered-seconds 1 --offered-rounds 1",
        {},
    ),
    "replay": ("--bars 300", {}),
    "swaps": ("--seconds 1 --rounds 1", {}),
    "memory": ("--rounds 2 --rows 2000", {}),
    "rollup": ("--hours 0.25", {}),
    "calls": ("--seconds 0.5", {}),
}
"""Per section: the options (split at spaces) and environment of its smoke run (``--smoke``)."""


def smoke(chosen: list[str]) -> int:
    """Run each section of ``chosen`` once, small, in a process of its own; 1 if any failed."""
    failed = []
    for name in chosen:
        options, env = SMOKE[name]
        print(f"\n##### {name} (smoke)", flush=True)
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", SECTIONS[name], *options.split()],
            env=os.environ | env,
            cwd=REPO,
            check=False,
        )
        took = time.perf_counter() - started
        if done.returncode != 0:
            failed.append(name)
        print(f"##### {name} (smoke) exit {done.returncode}, took {took:.0f}s", flush=True)
    if failed:
        print(f"bench smoke: {len(failed)} of {len(chosen)} sections failed: {', '.join(failed)}")
        return 1
    print(f"bench smoke: all {len(chosen)} sections ran")
    return 0


def main(argv: list[str]) -> int:
    smoke_run = "--smoke" in argv
    argv = [arg for arg in argv if arg != "--smoke"]
    chosen = argv or list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        print(f"bench: unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        return 2
    if smoke_run:
        return smoke(chosen)
    sys.argv = sys.argv[:1]  # each section parses its own (default) options
    for name in chosen:
        module = importlib.import_module(SECTIONS[name])
        print(f"\n##### {name}", flush=True)
        started = time.perf_counter()
        module.main()
        print(f"##### {name} took {time.perf_counter() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
