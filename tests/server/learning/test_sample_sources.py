"""Each stored sample keeps its source (who sent it) through SQLite, compaction to Parquet and
a restart; a store written before sources were recorded opens, keeps every record, and reads
its old samples as source-less (untrusted), both the SQLite rows and the Parquet parts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xylen_server.auth import ADMIN_TOKEN_IDENTITY, ANONYMOUS, is_trusted
from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.samples import (
    DB_NAME,
    PARTS_DIR,
    SCHEMA,
    FeedbackRecord,
    read_samples,
    records_table,
)

OLD_SQL = """
CREATE TABLE stored_ids (prediction_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE samples (
    seq INTEGER PRIMARY KEY, prediction_id TEXT NOT NULL, model_name TEXT NOT NULL,
    model_version INTEGER, features BLOB NOT NULL, probability_up REAL, signal INTEGER,
    pnl REAL NOT NULL, realized_return REAL NOT NULL, close_time_ms INTEGER NOT NULL,
    received_time_ms INTEGER NOT NULL
);
"""


def record(pid: str, source: str = ANONYMOUS) -> FeedbackRecord:
    return FeedbackRecord(
        pid, "model_1", 1, np.arange(4, dtype=np.float32), 0.6, 1, 1.0, 0.01,
        1_700_000_000_000, 1_700_000_001_000, source,
    )  # fmt: skip


def sources(directory: Path) -> dict[str, str | None]:
    frame = read_samples(directory)
    return dict(zip(frame["prediction_id"].to_list(), frame["source"].to_list(), strict=True))


def test_sources_survive_compaction_and_restart(tmp_path: Path) -> None:
    with FeedbackStore(tmp_path, compact_on_close=False) as store:
        store.append(record("a", ADMIN_TOKEN_IDENTITY))
        store.append(record("b", "mtls:coordinator"))
        store.compact()
        store.append(record("c"))
    expected = {"a": ADMIN_TOKEN_IDENTITY, "b": "mtls:coordinator", "c": ANONYMOUS}
    assert sources(tmp_path) == expected
    with FeedbackStore(tmp_path) as store:  # compacts everything at close
        assert store.append(record("a")).duplicate
    assert sources(tmp_path) == expected
    assert [is_trusted(s) for s in expected.values()] == [True, True, False]


def test_a_store_from_before_sources_opens_and_keeps_every_record(tmp_path: Path) -> None:
    old_part = records_table([record("old-parquet")]).drop(["source"])
    assert "source" not in old_part.schema.names
    (tmp_path / PARTS_DIR).mkdir()
    pq.write_table(old_part, tmp_path / PARTS_DIR / f"part-{1:016d}-{1:016d}.parquet")
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.executescript(OLD_SQL)
        db.execute("INSERT INTO stored_ids VALUES ('old-parquet'), ('old-sqlite')")
        db.execute(
            "INSERT INTO samples VALUES (2, 'old-sqlite', 'model_1', 1, ?, 0.6, 1, 1.0, 0.01, "
            "1700000000000, 1700000001000)",
            (np.arange(4, dtype="<f4").tobytes(),),
        )
    with FeedbackStore(tmp_path, compact_on_close=False) as store:
        assert store.count() == 2
        store.append(record("new", ADMIN_TOKEN_IDENTITY))
        assert store.count() == 3
    assert sources(tmp_path) == {
        "old-parquet": None,
        "old-sqlite": None,
        "new": ADMIN_TOKEN_IDENTITY,
    }
    assert not is_trusted(None)
    assert pa.types.is_string(SCHEMA.field("source").type)
