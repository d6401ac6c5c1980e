"""A samples directory written before labels were computed at store time opens, keeps its
samples with their old label, and takes new ones with the new columns."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.samples import DB_NAME, PARTS_DIR, SCHEMA, FeedbackRecord, records_table

OLD_SQL = """
CREATE TABLE stored_ids (prediction_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE samples (
    seq INTEGER PRIMARY KEY, prediction_id TEXT NOT NULL, model_name TEXT NOT NULL,
    model_version INTEGER, features BLOB NOT NULL, probability_up REAL, signal INTEGER,
    pnl REAL NOT NULL, realized_return REAL NOT NULL, close_time_ms INTEGER NOT NULL,
    received_time_ms INTEGER NOT NULL
);
"""


def test_a_store_from_before_the_label_columns_opens_and_keeps_its_samples(tmp_path: Path):
    features = np.arange(3, dtype=np.float32)
    part_record = FeedbackRecord(
        "old-part", "model_1", 1, features, None, None, 1.0, 0.02, 1_700_000_000_000, 1, 1
    )
    old_part = records_table([part_record]).drop_columns(
        ["source", "side", "underlying_log_return"]
    )
    (tmp_path / PARTS_DIR).mkdir()
    pq.write_table(
        old_part, tmp_path / PARTS_DIR / "part-00000000000000000001-00000000000000000001.parquet"
    )
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(OLD_SQL)
    db.execute("INSERT INTO stored_ids VALUES ('old-part'), ('old-row')")
    db.execute(
        "INSERT INTO samples VALUES (2, 'old-row', 'model_1', 1, ?, NULL, NULL, -1.0, -0.01, "
        "1700000000001, 2)",
        (features.tobytes(),),
    )
    db.commit()
    db.close()

    new = FeedbackRecord(
        "new", "model_1", 1, features, 0.6, 1, 5.0, 0.03, 1_700_000_000_002, 3,
        label=0, side=2, underlying_log_return=-0.03,
    )  # fmt: skip
    with FeedbackStore(tmp_path) as store:
        assert store.append(new).duplicate is False
        assert store.append(part_record).duplicate is True
        frame = store.read_samples()
    assert frame.columns == SCHEMA.names
    rows = {row["prediction_id"]: row for row in frame.to_dicts()}
    assert set(rows) == {"old-part", "old-row", "new"}
    assert rows["old-part"]["label"] == 1 and rows["old-part"]["side"] is None
    assert rows["old-row"]["label"] == 0 and rows["old-row"]["underlying_log_return"] is None
    # the new sample: a short that made money, stored as the down move it was
    assert (rows["new"]["label"], rows["new"]["side"]) == (0, 2)
    assert rows["new"]["underlying_log_return"] == -0.03
