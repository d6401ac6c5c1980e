"""Child process for the feedback crash tests: appends outcomes as fast as it can and prints
each prediction id only after ``append`` returned (so a printed id is an acknowledged one).

    python feedback_child.py DIR stream COMPACT_ROWS     # append until killed
    python feedback_child.py DIR crash-at STEP COUNT     # append COUNT, then compact and
                                                         # SIGKILL itself at compaction STEP
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.samples import FeedbackRecord

_print_lock = threading.Lock()


def record(prefix: str, i: int) -> FeedbackRecord:
    features = (np.arange(8, dtype=np.float32) + i) / np.float32(7)
    return FeedbackRecord(
        f"{prefix}-{i}",
        "model_1",
        1,
        features,
        0.5,
        1,
        1.5 * i,
        0.001 * (i % 5 - 2),
        1_700_000_000_000 + i,
        1_700_000_000_500 + i,
        int(i % 5 - 2 > 0),
    )


def acknowledge(prediction_id: str) -> None:
    with _print_lock:
        sys.stdout.write(prediction_id + "\n")
        sys.stdout.flush()


def stream(directory: Path, compact_rows: int) -> None:
    store = FeedbackStore(directory, compact_rows=compact_rows)

    def appender(worker: int) -> None:
        i = 0
        while True:
            result = store.append(record(f"w{worker}", i))
            assert not result.duplicate
            acknowledge(f"w{worker}-{i}")
            i += 1

    threads = [threading.Thread(target=appender, args=(w,), daemon=True) for w in range(8)]
    for thread in threads:
        thread.start()
    threading.Event().wait()


def crash_at(directory: Path, step: str, count: int) -> None:
    def hook(name: str) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    store = FeedbackStore(directory, compact_rows=0, fault_hook=hook)
    for i in range(count):
        store.append(record("c", i))
        acknowledge(f"c-{i}")
    store.compact()
    raise SystemExit("the fault hook did not fire")


if __name__ == "__main__":
    target, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "stream":
        stream(target, int(sys.argv[3]))
    else:
        crash_at(target, sys.argv[3], int(sys.argv[4]))
