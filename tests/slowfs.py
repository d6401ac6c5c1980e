"""A slow disk for the fault tests: a passthrough FUSE filesystem over a real directory that
sleeps before every write and every fsync, run as its own process (fusepy over libfuse 2).

    python tests/slowfs.py BACKING MOUNT WRITE_DELAY_MS FSYNC_DELAY_MS

It prints ``ready`` once MOUNT serves and, when unmounted (``fusermount -u MOUNT``) or sent
SIGTERM, one line ``fsyncs=N writes=N`` counting the delayed calls. Only what a database and
Parquet writer need is passed through; nothing is cached by the filesystem itself.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from typing import Any

from fuse import FUSE, FuseOSError, Operations  # fusepy


class SlowPassthrough(Operations):  # type: ignore[misc]
    def __init__(self, root: str, write_delay: float, fsync_delay: float) -> None:
        self.root = os.path.realpath(root)
        self.write_delay = write_delay
        self.fsync_delay = fsync_delay
        self.fsyncs = 0
        self.writes = 0
        self._count = threading.Lock()

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def __call__(self, op: str, path: str, *args: Any) -> Any:
        try:
            return super().__call__(op, path, *args)
        except OSError as exc:
            raise FuseOSError(exc.errno or errno.EIO) from None

    # -- metadata ------------------------------------------------------------------------------

    def access(self, path: str, mode: int) -> None:
        if not os.access(self._full(path), mode):
            raise FuseOSError(errno.EACCES)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._full(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._full(path), uid, gid)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._full(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size")
        return {key: getattr(st, key) for key in (*keys, "st_uid")}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._full(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._full(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._full(path))

    def rename(self, old: str, new: str) -> None:
        os.replace(self._full(old), self._full(new))

    def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
        os.utime(self._full(path), times)

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files")
        return {key: getattr(st, key) for key in (*keys, "f_flag", "f_frsize", "f_namemax")}

    # -- files ---------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        return os.open(self._full(path), flags)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        # fusepy does not pass the caller's flags; read-write serves every caller (SQLite maps
        # its -shm file: a write-only handle would fail the page reads with SIGBUS).
        return os.open(self._full(path), os.O_RDWR | os.O_CREAT, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        time.sleep(self.write_delay)
        with self._count:
            self.writes += 1
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        os.truncate(self._full(path) if fh is None else fh, length)

    def flush(self, path: str, fh: int) -> None:
        return None

    def release(self, path: str, fh: int) -> None:
        os.close(fh)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        time.sleep(self.fsync_delay)
        with self._count:
            self.fsyncs += 1
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        time.sleep(self.fsync_delay)
        with self._count:
            self.fsyncs += 1


def main() -> None:
    backing, mount, write_ms, fsync_ms = sys.argv[1:5]
    fs = SlowPassthrough(backing, float(write_ms) / 1000, float(fsync_ms) / 1000)

    def announce() -> None:  # once the kernel sees the mount
        while not os.path.ismount(mount):
            time.sleep(0.01)
        print("ready", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    try:
        FUSE(fs, mount, foreground=True, nothreads=False, default_permissions=True)
    finally:
        print(f"fsyncs={fs.fsyncs} writes={fs.writes}", flush=True)


if __name__ == "__main__":
    main()
