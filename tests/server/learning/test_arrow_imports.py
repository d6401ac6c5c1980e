"""The prediction log's flusher and reader and the feedback store's compactor, in a fresh
process, write and read Parquet without importing pandas, ``pyarrow.compute`` or
``pyarrow.dataset`` (pandas alone costs a server ~36 MiB of RSS, see
``xylen_server/learning/arrow_columns.py``), and what they write is what polars and pyarrow's
own readers read: the same ids, times, features, nulls and types as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from harness import modules_of_child

from xylen_server.learning import arrow_columns as columns
from xylen_server.learning import prediction_log, samples

REPO = Path(__file__).resolve().parents[3]

UNWANTED = ("pandas", "pyarrow.compute", "pyarrow.dataset", "polars")

CHILD = """
import json, sys
from pathlib import Path
import numpy as np
import xylen_server.server  # everything `python -m xylen_server` imports
from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.prediction_log import PredictionLog
from xylen_server.learning.samples import FeedbackRecord

root = Path(sys.argv[1])
features = np.arange(3 * 25, dtype=np.float32).reshape(3, 25) / np.float32(7)
ids = ["p-0", "p-1", "a-much-longer-prediction-id-than-thirty-two-bytes"]
with PredictionLog(root / "log", flush_interval_seconds=3600) as log:
    log.record(ids, features, [0.25, 0.5, 0.75], [2, 3, 1], "model_1", 4, time_ms=1_700_000_000_123)
    assert log.flush() is not None
# a fresh log (a restarted server) finds the rows in the part file only
fresh = PredictionLog(root / "log", flush_interval_seconds=3600, max_age_seconds=10**9)
found = fresh.find_recent(ids[2])
assert found is not None and found.prediction_id == ids[2], found
assert np.array_equal(found.features, features[2]) and found.time_ms == 1_700_000_000_123
assert (found.model_name, found.model_version, found.probability_up, found.signal) == (
    "model_1", 4, 0.75, 1)
assert fresh.find("p-0").probability_up == 0.25 and fresh.find("nope") is None
assert [r.prediction_id for r in fresh.replay_rows(model_version=4, start_ms=0)] == ids
fresh.close()
store = FeedbackStore(root / "feedback", compact_rows=0)
store.append(FeedbackRecord("p-0", "model_1", 4, features[0], 0.25, 2, -1.5, -0.01,
                            1_700_000_100_000, 1_700_000_100_001, 0, source="alice", side=2,
                            underlying_log_return=0.0125))
store.append(FeedbackRecord("p-1", "model_1", None, features[1], None, None, 2.0, 0.02,
                            1_700_000_200_000, 1_700_000_200_001, 1))
assert store.compact() is not None
store.close()
print(json.dumps(sorted(sys.modules)))
"""


def test_log_and_compaction_import_neither_pandas_nor_arrow_compute(tmp_path: Path) -> None:
    modules = modules_of_child(CHILD, str(tmp_path))
    assert "pyarrow.parquet" in modules  # the check sees pyarrow's modules
    assert modules.isdisjoint(UNWANTED), sorted(modules & set(UNWANTED))

    # the prediction-log part, read by the tools' readers
    (part,) = sorted((tmp_path / "log").glob("part-*.parquet"))
    table = pq.read_table(part)
    assert table.schema == prediction_log.SCHEMA
    frame = pl.read_parquet(part)
    assert frame["prediction_id"].to_list() == [
        "p-0",
        "p-1",
        "a-much-longer-prediction-id-than-thirty-two-bytes",
    ]
    assert frame["time"].dt.epoch("ms").to_list() == [1_700_000_000_123] * 3
    assert frame["signal"].to_list() == [2, 3, 1]
    assert frame["probability_up"].to_list() == [0.25, 0.5, 0.75]
    expected = np.arange(3 * 25, dtype=np.float32).reshape(3, 25) / np.float32(7)
    assert np.array_equal(np.array(frame["features"].to_list(), dtype=np.float32), expected)

    # the compacted samples, nulls where the record had None
    (compacted,) = samples.part_files(tmp_path / "feedback")
    assert pq.read_schema(compacted) == samples.SCHEMA
    got = samples.read_samples(tmp_path / "feedback").to_dicts()
    assert [(r["prediction_id"], r["model_version"], r["probability_up"]) for r in got] == [
        ("p-0", 4, 0.25),
        ("p-1", None, None),
    ]
    assert [(r["signal"], r["side"], r["underlying_log_return"]) for r in got] == [
        (2, 2, 0.0125),
        (None, 0, None),
    ]
    assert [r["label"] for r in got] == [0, 1]
    assert [r["source"] for r in got] == ["alice", "anonymous"]
    assert [r["pnl"] for r in got] == [-1.5, 2.0]
    assert np.array_equal(np.array(got[1]["features"], dtype=np.float32), expected[1])


def test_columns_round_trip_slices_and_nulls() -> None:
    values = np.array([3, -1, 7, 9], dtype=np.int64)
    array = columns.fixed(values, pa.timestamp("ms", tz="UTC"))
    assert array.type == pa.timestamp("ms", tz="UTC") and array.null_count == 0
    assert columns.to_numpy(array).tolist() == [3, -1, 7, 9]
    assert columns.to_numpy(array.slice(1, 2)).tolist() == [-1, 7]
    chunked = pa.chunked_array([array.slice(0, 1), array.slice(2, 2)])
    assert columns.to_numpy(chunked).tolist() == [3, 7, 9]
    assert columns.to_numpy(columns.fixed([], pa.float64())).tolist() == []

    with_nulls = columns.nullable([1.5, None, -2.0], pa.float64())
    assert with_nulls.to_pylist() == [1.5, None, -2.0] and with_nulls.null_count == 1
    with pytest.raises(ValueError, match="1 nulls"):
        columns.to_numpy(with_nulls)

    text = columns.strings(["é", None, "", "abc"])
    assert text.to_pylist() == ["é", None, "", "abc"] and text.type == pa.string()
    text.validate(full=True)

    lists = columns.float32_lists(
        np.array([0, 2, 2, 5], dtype=np.int32), np.arange(5, dtype=np.float32)
    )
    lists.validate(full=True)
    assert lists.to_pylist() == [[0.0, 1.0], [], [2.0, 3.0, 4.0]]
    offsets, flat = columns.float32_lists_to_numpy(lists.slice(2, 1))
    assert flat[offsets[0] : offsets[1]].tolist() == [2.0, 3.0, 4.0]

    with pytest.raises(TypeError, match="no fixed-width"):
        columns.fixed([1], pa.string())


def test_strings_from_fixed_width_bytes_keep_each_value_up_to_its_padding() -> None:
    values = np.array([b"abc", b"", "é-1".encode(), b"x\x00y", b"z" * 32], dtype="S32")
    column = columns.strings_from_fixed(values)
    column.validate(full=True)
    assert column.to_pylist() == ["abc", "", "é-1", "x\x00y", "z" * 32]  # as numpy reads them
    assert column.to_pylist() == [v.decode() for v in values]
    assert columns.strings_from_fixed(np.array([], dtype="S32")).to_pylist() == []
    assert columns.strings_from_fixed(values[::2]).to_pylist() == ["abc", "é-1", "z" * 32]
