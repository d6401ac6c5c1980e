"""The clock the learning loop reads: the wall clock, or a replay's simulated one.

Production reads the wall clock (``CLOCK_FILE`` unset). A walk-forward replay (``backtest``)
sets ``CLOCK_FILE`` on every server and the coordinator and writes the simulated "now" (epoch
milliseconds, one integer) into that file as it advances bar by bar, so a Feedback whose close
time lies after the simulated now is refused (OUTCOME_IN_FUTURE) exactly as one in the real
future is, and predictions are logged at the simulated time they were made. Only the learning
loop's times follow it (prediction log, Feedback checks, received times); deadlines, retries
and timeouts keep the monotonic clock.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

_file: Path | None = None
_last_ms = 0


class ClockError(ValueError):
    """The clock file is missing or does not hold one integer."""


def _read(path: Path) -> int:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ClockError(f"CLOCK_FILE {path}: {exc.strerror or exc}") from None
    try:
        return int(text.strip())
    except ValueError:
        raise ClockError(f"CLOCK_FILE {path} does not hold epoch milliseconds") from None


def use_file(path: Path | None) -> None:
    """Read "now" from ``path`` from here on (None: the wall clock). The file must be readable
    now (:class:`ClockError` otherwise), so a mistake stops the process at start."""
    global _file, _last_ms
    if path is not None:
        _last_ms = _read(path)
    _file = path


def simulated() -> bool:
    """Whether the clock is a replay's."""
    return _file is not None


def now_ms() -> int:
    """Now in UTC epoch milliseconds. A simulated clock whose file cannot be read for a moment
    (being replaced) keeps its last value."""
    global _last_ms
    path = _file
    if path is None:
        return time.time_ns() // 1_000_000
    with contextlib.suppress(ClockError):
        _last_ms = _read(path)
    return _last_ms


def now_seconds() -> float:
    """:func:`now_ms` in epoch seconds."""
    if _file is None:
        return time.time()
    return now_ms() / 1000


def write(path: Path, ms: int) -> None:
    """Set a simulated clock: replace ``path`` atomically with ``ms``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{int(ms)}\n")
    tmp.replace(path)
