"""The files a test's code opens in a directory, as the kernel reports them (inotify
``IN_OPEN`` on the directory): which prediction-log parts a lookup or a merge read, and how
often the directory itself was listed. Skips the test where inotify is not available."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

IN_OPEN = 0x20


class Opened:
    """The ``.parquet`` files opened in ``directory`` (and its listings) since the last ask."""

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip(f"no inotify here (errno {ctypes.get_errno()})")
        if libc.inotify_add_watch(self.fd, os.fsencode(directory), IN_OPEN) < 0:
            os.close(self.fd)
            pytest.skip(f"cannot watch {directory} (errno {ctypes.get_errno()})")
        self.listings = 0
        """Opens of the directory itself (a listing), counted by :meth:`names`."""

    def names(self) -> set[str]:
        """The part files opened since the last call."""
        found: set[str] = set()
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return found
            at = 0
            while at < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, at)
                name = data[at + 16 : at + 16 + length].rstrip(b"\0").decode()
                at += 16 + length
                if not name:
                    self.listings += 1
                elif name.endswith(".parquet"):
                    found.add(name)

    def during(self, action: Callable[[], object]) -> tuple[object, set[str]]:
        """``action()``'s result and the part files it opened."""
        self.names()
        result = action()
        return result, self.names()

    def close(self) -> None:
        os.close(self.fd)
