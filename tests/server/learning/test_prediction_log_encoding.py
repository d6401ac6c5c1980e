"""The prediction log's part files put only the model name in a dictionary: ids, features and
probabilities are nearly all distinct, where a dictionary costs the flusher (the serving
process's CPU) a hash-table insert per value for a larger file. Real files, read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from xylen_server.learning.prediction_log import PredictionLog


def _encodings(part: Path) -> dict[str, set[str]]:
    metadata = pq.ParquetFile(part).metadata
    found: dict[str, set[str]] = {}
    for group in range(metadata.num_row_groups):
        for column in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(column)
            found.setdefault(chunk.path_in_schema.split(".")[0], set()).update(chunk.encodings)
    return found


def test_only_the_model_name_is_dictionary_encoded_and_rows_read_back_exactly(
    tmp_path: Path,
) -> None:
    rows = 2_000
    rng = np.random.default_rng(7)
    features = rng.standard_normal((rows, 25)).astype(np.float32)
    probabilities = rng.random(rows)
    ids = [f"0123456789ab-{i:x}" for i in range(rows)]
    log = PredictionLog(tmp_path)
    log.record(ids, features, probabilities, np.ones(rows, dtype=np.int8), "model_1", 3)
    part = log.flush()
    log.close()
    assert part is not None
    encodings = _encodings(part)
    assert (
        "RLE_DICTIONARY" in encodings["model_name"] or "PLAIN_DICTIONARY" in encodings["model_name"]
    )
    for name in ("prediction_id", "features", "probability_up"):
        assert not encodings[name] & {"RLE_DICTIONARY", "PLAIN_DICTIONARY"}, (name, encodings)
    table = pq.read_table(part)
    assert table.column("prediction_id").to_pylist() == ids
    assert table.column("model_name").to_pylist() == ["model_1"] * rows
    np.testing.assert_array_equal(
        np.array(table.column("features").to_pylist(), dtype=np.float32), features
    )
    np.testing.assert_array_equal(table.column("probability_up").to_numpy(), probabilities)
