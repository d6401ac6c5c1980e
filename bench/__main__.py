"""``make bench``: every benchmark, one after another, printing labelled figures.

``python -m bench [server|training|feedback|coordinator|learning|security|fleet|load|telemetry
dask|workers|replay|swaps|memory|rollup|calls ...]`` runs a subset.
Figures are measured side by side within each section; on shared machines compare the ratios.
"""

from __future__ import annotations

import importlib
import sys
import time

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


def main(argv: list[str]) -> int:
    chosen = argv or list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        print(f"bench: unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        return 2
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
