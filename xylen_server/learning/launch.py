"""Start a retrain job at low priority *before* it imports anything heavy.

``python -m xylen_server.learning.launch NICE SPEC.json`` lowers this process's priority
(``os.nice(NICE)``) and only then imports and runs :mod:`xylen_server.learning.job`. Importing
polars, scikit-learn and LightGBM alone costs about a second of CPU; at normal priority that
second showed up in the server's Predict p99.

Not SCHED_IDLE: measured on the 2-vCPU machines, a CPU-bound SCHED_IDLE process *raised* a
server's Predict p99 from 0.7 to 4.1 ms (the kernel treats its CPU as idle and places the
server's wake-ups there), while the same process at nice 10 or 19 left it at 0.75 ms.
"""

from __future__ import annotations

import contextlib
import os
import sys


def lower_priority(nice: int) -> None:
    """Add ``nice`` to this process's niceness (at most 19)."""
    if nice > 0:
        with contextlib.suppress(OSError):
            os.nice(nice)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    lower_priority(int(args[0]))
    from xylen_server.learning.job import main as run_job

    return run_job(args[1:])


if __name__ == "__main__":
    sys.exit(main())
