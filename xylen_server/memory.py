"""Giving memory freed after a burst back to the system.

The C allocator (glibc malloc) keeps the pages of freed blocks for reuse, so after a flood of
large requests a server's RSS stays near its peak although Python and grpc have freed the
objects. :func:`trim_periodically` asks the allocator every ``MEMORY_TRIM_INTERVAL_SECONDS`` to
return its free pages (``malloc_trim(0)``, on a worker thread, never on the event loop); where
the C library has no ``malloc_trim`` (not glibc) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    function = getattr(libc, "malloc_trim", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_MALLOC_TRIM = _find_malloc_trim()


def trim() -> bool:
    """Return the allocator's free pages to the system now (blocking, a few ms); False where
    this C library cannot."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


async def trim_periodically(interval_seconds: float) -> None:
    """Call :func:`trim` off the loop every ``interval_seconds`` until cancelled."""
    if interval_seconds <= 0 or _MALLOC_TRIM is None:
        return
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            await loop.run_in_executor(None, trim)
        except Exception as exc:  # never fatal: memory is only kept longer
            logger.warning("memory trim failed: %s", exc)
            return
