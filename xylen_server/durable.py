"""Durable state on disk, the one way xylen keeps it: SQLite in WAL mode with
``synchronous=FULL``.

The model server's feedback store and the coordinator's outbox each keep their state in one
SQLite file opened by :func:`sqlite_connect`, so both mean the same by "acknowledged": a
``COMMIT`` returns only once its WAL frames are fsynced, and a crash at any instant leaves
every committed transaction and none of the others. Import-light (the standard library and
:func:`training.metadata.fsync_dir`): the coordinator imports it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from training.metadata import fsync_dir

BUSY_TIMEOUT_MS = 10_000
"""How long a connection waits for another one's write transaction before failing."""


def sqlite_connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """A connection to the SQLite file ``path`` in autocommit mode (transactions are explicit
    ``BEGIN``/``COMMIT``), usable from any thread as long as one thread at a time uses it.

    Read-write: creates the file if needed, switches it to WAL mode (refusing a filesystem
    where WAL mode is unavailable rather than silently using a rollback journal), sets
    ``synchronous=FULL`` and fsyncs the directory when the file is new. Read-only: never
    creates or changes the file; it reads the latest committed state, beside a writer in
    another process.
    """
    if read_only:
        uri = f"{Path(path).resolve().as_uri()}?mode=ro"
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return db
    created = not path.exists()
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        (mode,) = db.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode != "wal":
            raise sqlite3.OperationalError(f"{path}: WAL mode is unavailable (journal {mode})")
        db.execute("PRAGMA synchronous=FULL")
    except BaseException:
        db.close()
        raise
    if created:
        fsync_dir(path.parent)
    return db
