"""A container's limits for a process started here: a cgroup with a memory limit and a CPU
quota (what compose's ``mem_limit: 256m`` and ``cpus: '0.5'`` make), for the memory test and
bench. cgroup v2 where its memory controller is enabled, else the v1 ``memory`` and ``cpu``
hierarchies; each cgroup is made under this process's own one and removed afterwards.
:func:`limited` returns None where neither is writable (not root, read-only /sys/fs/cgroup)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def _own(controller: str) -> Path | None:
    """This process's cgroup directory in the v1 hierarchy of ``controller``."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return ROOT / controller / path.lstrip("/")
    return None


@dataclass
class Limited:
    """The cgroup directories a process joins (one for v2; memory and cpu for v1)."""

    version: int
    memory: Path
    cpu: Path
    memory_bytes: int

    def join(self) -> None:
        """Put the calling process in the cgroup (a ``preexec_fn``: runs in the child)."""
        pid = str(os.getpid())
        for directory in {self.memory, self.cpu}:
            (directory / "cgroup.procs").write_text(pid)

    def oom_kills(self) -> int:
        """Processes the kernel killed for want of memory in the cgroup."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in (self.memory / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def peak_bytes(self) -> int:
        """Most memory the cgroup was charged (RSS and page cache) since it was made."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        path = self.memory / name
        return int(path.read_text()) if path.exists() else 0

    def usage_bytes(self) -> int:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return int((self.memory / name).read_text())


def _v2(name: str) -> Path | None:
    unified = ROOT / "unified" if (ROOT / "unified" / "cgroup.controllers").exists() else ROOT
    try:
        if "memory" not in (unified / "cgroup.controllers").read_text().split():
            return None
        own = Path("/proc/self/cgroup").read_text().splitlines()
        path = next(line.split(":", 2)[2] for line in own if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    parent = unified / path.lstrip("/")
    try:
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            return None
        directory = parent / name
        directory.mkdir()
        return directory
    except OSError:
        return None


@contextlib.contextmanager
def limited(
    memory_bytes: int, cpu_quota_us: int = 50_000, cpu_period_us: int = 100_000
) -> Iterator[Limited | None]:
    """A fresh cgroup limited to ``memory_bytes`` (no swap) and ``quota/period`` of a CPU, or
    None where cgroups cannot be made here. Removed on exit (its processes must be gone)."""
    name = f"xylen-limit-{os.getpid()}-{time.monotonic_ns()}"
    made: list[Path] = []
    result: Limited | None = None
    try:
        v2 = _v2(name)
        if v2 is not None:
            made.append(v2)
            (v2 / "memory.max").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):
                (v2 / "memory.swap.max").write_text("0")
            (v2 / "cpu.max").write_text(f"{cpu_quota_us} {cpu_period_us}")
            result = Limited(2, v2, v2, memory_bytes)
        else:
            memory_parent, cpu_parent = _own("memory"), _own("cpu")
            if memory_parent is not None and cpu_parent is not None:
                memory, cpu = memory_parent / name, cpu_parent / name
                memory.mkdir()
                made.append(memory)
                cpu.mkdir()
                made.append(cpu)
                (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
                with contextlib.suppress(OSError):  # no swap accounting: no swap to limit
                    (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
                (cpu / "cpu.cfs_period_us").write_text(str(cpu_period_us))
                (cpu / "cpu.cfs_quota_us").write_text(str(cpu_quota_us))
                result = Limited(1, memory, cpu, memory_bytes)
    except OSError:
        result = None
    try:
        yield result
    finally:
        for directory in reversed(made):
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)  # its last process is still exiting
