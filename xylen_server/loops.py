"""The running event loop, found cheaply on the hot path.

``asyncio.get_running_loop`` makes a ``getpid`` system call every time (its check that the
process has not forked since the loop started); a Predict that asks for the loop pays one per
ask. :class:`LoopCache` remembers the loop it found while that loop still runs on the asking
thread (asyncio's ``_thread_id``, set only while a loop runs, names its thread) and asks asyncio
again otherwise (another thread, another loop, a loop that stopped)."""

from __future__ import annotations

import asyncio
import threading


class LoopCache:
    """The running loop of the calling thread, remembered (see the module's docstring)."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        """The running loop; RuntimeError (asyncio's) when none runs on this thread."""
        loop = self._loop
        if loop is None or getattr(loop, "_thread_id", None) != threading.get_ident():
            loop = self._loop = asyncio.get_running_loop()
        return loop
