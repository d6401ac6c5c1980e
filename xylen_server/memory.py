"""Giving memory freed after a burst back to the system.

The C allocator (glibc malloc) keeps the pages of freed blocks for reuse, so after a flood of
large requests a server's RSS stays near its peak although Python and grpc have freed the
objects. :func:`trim_periodically` asks the allocator every ``MEMORY_TRIM_INTERVAL_SECONDS`` to
return its free pages (``malloc_trim(0)``, on a worker thread, never on the event loop); where
the C library has no ``malloc_trim`` (not glibc) it does nothing.

Arrow allocates its buffers from a pool of its own (mimalloc in the pyarrow wheels), which
keeps freed memory for reuse where ``malloc_trim`` cannot reach it: after a few prediction-log
flushes a loaded server held ~50 MiB more than with Arrow on the C library's malloc (whose
free pages the trim returns), so the server's default is ``system``
(``ARROW_DEFAULT_MEMORY_POOL``, :data:`ARROW_POOL_VARIABLE`).
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


ARROW_POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"
"""Arrow's own variable: read once, when pyarrow is imported, for its C++ default pool (what
the Parquet writer and reader allocate from). ``python -m xylen_server`` sets it from the
setting of the same name before it imports anything that imports pyarrow."""


def use_arrow_pool(name: str) -> tuple[str, str]:
    """Make ``name`` (``system``, ``mimalloc`` or ``jemalloc``) Arrow's default memory pool;
    returns (the backend Arrow uses now, the one it used before this call). In a server
    started by ``python -m xylen_server`` both are ``name`` (:data:`ARROW_POOL_VARIABLE` was
    set before pyarrow's import); where pyarrow was imported before (a server built inside
    another program, the tests) this moves pyarrow's Python-level default only, which the C++
    readers and writers do not all follow."""
    import pyarrow as pa

    before = str(pa.default_memory_pool().backend_name)
    if before != name:
        try:
            pa.set_memory_pool(getattr(pa, f"{name}_memory_pool")())
        except (AttributeError, NotImplementedError):
            logger.warning("Arrow memory pool %r is not in this pyarrow build", name)
    return str(pa.default_memory_pool().backend_name), before


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
