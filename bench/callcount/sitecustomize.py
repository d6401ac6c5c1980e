"""The bench's call counter: put this directory on a server's ``PYTHONPATH`` with
``XYLEN_BENCH_CALL_COUNT=<file>`` and, between a ``SIGUSR1`` and a ``SIGUSR2`` sent to the
process, every Python function call and every call of a C function from Python on its main
thread (the event loop's) is counted by function (``sys.setprofile``); ``SIGUSR2`` writes the
counts to ``<file>`` as tab-separated lines: count, ``py`` or ``c``, the function's file (a C
function's module), its name. ``python -m bench calls`` divides them by the calls answered
meanwhile: the Python work a request costs, a figure the machine's other tenants do not move.
Counting slows the process several times over, so its timings mean nothing meanwhile. Nothing
happens without the variable."""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from typing import Any

_PATH = os.environ.get("XYLEN_BENCH_CALL_COUNT")

if _PATH:
    _counts: Counter[tuple[str, str, str]] = Counter()

    def _count(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            _counts["py", code.co_filename, code.co_qualname] += 1
        elif event == "c_call":
            module = getattr(arg, "__module__", None) or ""
            _counts["c", module, getattr(arg, "__qualname__", "?")] += 1

    def _start(signum: int, frame: Any) -> None:
        _counts.clear()
        sys.setprofile(_count)

    def _stop(signum: int, frame: Any) -> None:
        sys.setprofile(None)
        written = f"{_PATH}.part"
        with open(written, "w", encoding="utf-8") as out:
            for (kind, where, name), count in _counts.most_common():
                out.write(f"{count}\t{kind}\t{where}\t{name}\n")
        os.replace(written, str(_PATH))  # whole, or not there yet

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
