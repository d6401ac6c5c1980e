"""The bench's garbage-collection probe: put this directory on a server's ``PYTHONPATH`` with
``XYLEN_GC_PROBE=<file>`` and every collection in that process is recorded (start on
``time.perf_counter``, i.e. CLOCK_MONOTONIC on Linux, duration, generation, whether it ran on
the main thread: the event loop's) and written to ``<file>`` as JSON lines when the process
exits. ``python -m bench swaps`` lays them beside the slowest Predicts. Nothing happens without
the variable."""

from __future__ import annotations

import atexit
import gc
import json
import os
import threading
import time

_PATH = os.environ.get("XYLEN_GC_PROBE")

if _PATH:
    _records: list[tuple[float, float, int, bool]] = []
    _started: dict[int, float] = {}
    _main = threading.main_thread().ident

    def _probe(phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        ident = threading.get_ident()
        if phase == "start":
            _started[ident] = now
        else:
            began = _started.pop(ident, now)
            _records.append((began, now - began, info["generation"], ident == _main))

    def _write() -> None:
        with open(str(_PATH), "w") as out:
            for began, seconds, generation, on_main in _records:
                out.write(json.dumps([began, seconds, generation, on_main]) + "\n")

    gc.callbacks.append(_probe)
    atexit.register(_write)
