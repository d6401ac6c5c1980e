"""A prediction log opened to read another process's (``xylen-server replay`` on a live
server's directory) changes nothing there: the writer's temporary files in flight, an
interrupted merge's journal and its parts, and ``_parts.index`` are the writer's. Before,
opening the log deleted every ``*.tmp`` (a flush or merge of the live server then failed) and
finished the merge itself. Real Parquet files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xylen_server.learning.prediction_log import INDEX_FILE, ROLLUP_FILE, PredictionLog


def _write_parts(directory: Path, parts: int = 3) -> list[str]:
    log = PredictionLog(directory, flush_interval_seconds=3600, fsync=False, rollup_seconds=0)
    ids: list[str] = []
    try:
        for k in range(parts):
            batch = [f"0123456789ab-{4 * k + i:x}" for i in range(4)]
            log.record(batch, np.full((4, 3), k, np.float32), [0.5] * 4, [3] * 4, "model_1", 1)
            assert log.flush() is not None
            ids += batch
    finally:
        log.close()
    return ids


def _state(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_reader_finds_every_row_and_changes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    ids = _write_parts(directory)
    (directory / INDEX_FILE).unlink()  # parts without index lines: a writer would add them
    (directory / "part-1800000000000-00000099.parquet.tmp").write_bytes(b"a flush in flight")
    (directory / "_rollup-part-x.parquet.tmp").write_bytes(b"a merge in flight")
    before = _state(directory)
    reader = PredictionLog(directory, reader=True)
    try:
        for prediction_id in (ids[0], ids[-1]):
            found = reader.find(prediction_id)
            assert found is not None and found.prediction_id == prediction_id
            recent = reader.find_recent(prediction_id)
            assert recent is not None and recent.prediction_id == prediction_id
        assert reader.find_recent("0123456789ab-ffff") is None
        assert len(reader.part_files()) == 3
    finally:
        reader.close()
    assert _state(directory) == before


def test_a_reader_leaves_an_interrupted_merge_to_the_writer(tmp_path: Path) -> None:
    """A journal naming a merged part not in place yet (the writer between its journal and
    its rename): a reader reads the parts as they are and deletes nothing."""
    directory = tmp_path / "log"
    ids = _write_parts(directory)
    names = sorted(p.name for p in directory.glob("part-*.parquet"))
    journal = {"part": "part-1800000000000-00000042.parquet", "replaces": names}
    (directory / ROLLUP_FILE).write_text(json.dumps(journal))
    before = _state(directory)
    reader = PredictionLog(directory, reader=True)
    try:
        assert [p.name for p in reader.part_files()] == names
        assert all(reader.find(i) is not None for i in ids)
    finally:
        reader.close()
    assert _state(directory) == before


def test_a_reader_keeps_what_is_recorded_in_it_in_memory(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    _write_parts(directory, 1)
    before = _state(directory)
    reader = PredictionLog(directory, reader=True)
    reader.record(["mine"], np.zeros((1, 3), np.float32), [0.5], [3], "model_1", 1)
    assert reader.get("mine") is not None
    assert reader.flush() is None
    reader.close()
    assert _state(directory) == before


def test_a_writer_after_a_crash_starts_its_index_line_on_a_line_of_its_own(
    tmp_path: Path,
) -> None:
    """A crash cut ``_parts.index``'s last append short: the next process's first line used to
    be glued onto it and lost (its part then read again at every restart to be indexed)."""
    from xylen_server.learning.part_index import _PartSummary

    directory = tmp_path / "log"
    _write_parts(directory, 2)
    with open(directory / INDEX_FILE, "a", encoding="utf-8") as index:
        index.write('{"part":"part-17999')  # the crash
    log = PredictionLog(directory, flush_interval_seconds=3600, fsync=False, rollup_seconds=0)
    try:
        log.record(["after-the-crash"], np.zeros((1, 3), np.float32), [0.5], [3], "model_1", 1)
        part = log.flush()
        assert part is not None
    finally:
        log.close()
    lines = (directory / INDEX_FILE).read_text().splitlines()
    summaries = [_PartSummary.parse(line) for line in lines]
    listed = {s.name for s in summaries if s is not None}
    assert part.name in listed
    assert listed == {p.name for p in directory.glob("part-*.parquet")}
    assert sum(s is None for s in summaries) == 1  # only the torn line
