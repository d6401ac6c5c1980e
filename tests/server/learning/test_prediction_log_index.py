"""The prediction log's id index against a trivially correct model: after many wraps of the
ring, with batches of every size, odd ids and rows aging out, ``get`` answers exactly the rows a
list of the last ``capacity`` recorded rows holds; and a lookup of an id it does not hold reads a
few index entries, not the whole table, however long the log has run."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from learning_helpers import python_calls

from xylen_server.learning import part_index
from xylen_server.learning.prediction_log import ID_BYTES, SEGMENT_PARTS, PredictionLog


class _CountingTable(np.ndarray):
    """The index table, counting the entries read one at a time (what ``get`` does)."""

    reads = 0

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        if isinstance(key, int | np.integer):
            _CountingTable.reads += 1
        return super().__getitem__(key)


def test_an_unknown_id_reads_a_few_index_entries_after_the_table_is_reused_all_over() -> None:
    """Entries are reused, never emptied: after a few million rows (minutes to hours of a busy
    server at the default 200,000 rows) no entry was empty any more, and a lookup of an id not
    held (every Feedback for a row answered by another worker, or aged out) walked the whole
    table, 524,288 entries, ~140 ms of CPU under the lock every Predict takes. Fails before,
    passes after."""
    capacity = 1024
    log = PredictionLog(None, max_rows=capacity)
    features = np.zeros((64, 3), np.float32)
    start = 0
    while log._ring is None or (log._ring.table == 0).any():
        ids = [f"0123456789ab-{i:x}" for i in range(start, start + 64)]
        log.record(ids, features, [0.5] * 64, [1] * 64, "model_1", 1)
        start += 64
        assert start < 1000 * capacity  # the table fills up long before
    ring = log._ring
    size = len(ring.table)
    ring.table = ring.table.view(_CountingTable)
    _CountingTable.reads = 0
    unknown = 200
    assert all(log.get(f"never-predicted-{i}") is None for i in range(unknown))
    per_lookup = _CountingTable.reads / unknown
    assert per_lookup < size / 16, (per_lookup, size)
    # and the rows it holds are all still found through the same bounded probe
    assert all(log.get(f"0123456789ab-{i:x}") is not None for i in range(start - capacity, start))


def _id(rng: random.Random, n: int) -> str:
    kind = rng.random()
    if kind < 0.7:
        return f"0123456789ab-{n:x}"  # the server's own shape
    if kind < 0.8:
        return f"caller-{n}-" + "x" * rng.randrange(ID_BYTES - 10, ID_BYTES + 20)  # long
    if kind < 0.9:
        return f"ü-{n}-π-" + "€" * rng.randrange(0, 12)  # multibyte, some past ID_BYTES
    return f"pad-{n}\0"  # a trailing NUL, which the fixed-width column would drop


@pytest.mark.parametrize("seed", range(12))
def test_get_answers_exactly_what_a_list_of_the_last_rows_holds(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.choice([1, 2, 3, 7, 16, 33, 100])
    max_age_s = 3600
    log = PredictionLog(None, max_rows=capacity, max_age_seconds=max_age_s)
    now = time.time_ns() // 1_000_000
    t = now - 3 * max_age_s * 1000  # rows start well past the age limit and move to now
    recorded: list[tuple[str, int, float]] = []  # (id, time ms, probability), in order
    n = 0
    for _ in range(rng.randrange(20, 120)):
        rows = rng.choice([1, 1, 2, 5, 8, 9, 17, capacity, capacity + 3, 3 * capacity])
        ids = [_id(rng, n + k) for k in range(rows)]
        n += rows
        t = min(now - 120_000, t + rng.randrange(0, 200) * 1000)  # none near the limit
        if rng.random() < 0.05:
            t = now - 120_000
        probabilities = [rng.random() for _ in range(rows)]
        features = np.full((rows, 4), rows, np.float32)
        log.record(ids, features, probabilities, [3] * rows, "model_1", 1, time_ms=t)
        recorded += [(i, t, p) for i, p in zip(ids, probabilities, strict=True)]
        held = {i: (ti, p) for i, ti, p in recorded[-capacity:] if ti >= now - max_age_s * 1000}
        for i, ti, p in recorded[-3 * capacity - 5 :]:
            row = log.get(i)
            if i in held:
                assert row is not None, (seed, i)
                assert (row.prediction_id, row.time_ms, row.probability_up) == (i, ti, p)
            else:
                assert row is None, (seed, i)
        assert log.get(f"never-{n}") is None
        assert len(log) >= len(held)


def test_a_disk_lookup_costs_the_same_however_many_old_parts_the_log_has(tmp_path) -> None:
    """find_recent (Feedback's fallback for an id not in memory: after a restart, or answered
    by no worker) listed the directory as sorted Path objects and walked an entry of every
    part ever written on each call: with a part every 5 s, 47 ms of CPU per unknown id at
    5,000 parts (7 hours), growing with the log's age. Now a listing of names and a set
    difference in C. Measured without a clock: the Python calls of one lookup (indexing the
    two parts written since the last one) were 222 with 2 old parts and 25,347 with 600
    before (fails before, passes after); 102 and 102 now."""

    def calls_of_one_lookup(old_parts: int, directory) -> int:
        log = PredictionLog(directory, flush_interval_seconds=3600, fsync=False,
                            max_age_seconds=3600, max_rows=1)  # fmt: skip
        now = time.time_ns() // 1_000_000
        row = np.zeros((1, 3), np.float32)
        try:
            for k in range(old_parts):  # each its own part, two hours old
                log.record([f"old-{k}"], row, [0.5], [3], "model_1", 1, time_ms=now - 7_200_000)
                log.flush()
            for name in ("live-0", "filler-0"):  # memory holds the last row only
                log.record([name], row, [0.5], [3], "model_1", 1)
                log.flush()
            assert log.find_recent("live-0") is not None  # from disk: indexes the parts once
            for name in ("live-1", "filler-1"):
                log.record([name], row, [0.5], [3], "model_1", 1)
                log.flush()
            missing, counted = python_calls(lambda: log.find_recent("never-predicted"))
            assert missing is None
            assert log.find_recent("live-1") is not None  # a part written since is seen
            assert log.find_recent("old-3") is None  # too old
            return counted
        finally:
            log.close()

    few = calls_of_one_lookup(2, tmp_path / "few")
    many = calls_of_one_lookup(600, tmp_path / "many")
    print(f"\nPython calls of one disk lookup: {few} with 2 old parts, {many} with 600")
    assert many <= few + 10, (few, many)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("listed", [0, part_index.MAX_LISTED_IDS])
def test_disk_lookups_across_merged_segments_agree_with_a_dict(
    tmp_path, seed: int, listed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of parts (several merged segments of SEGMENT_PARTS, and the rest), some older
    than the retention, more written after the first lookup: find_recent answers exactly the
    rows within the retention, from a log whose memory holds none of them. ``listed`` 0: no
    part's summary can list its ids, so every part goes through the hash index and its
    segments; the default: the summaries find them, no part is read to be indexed."""
    monkeypatch.setattr(part_index, "MAX_LISTED_IDS", listed)
    rng = random.Random(seed)
    now = time.time_ns() // 1_000_000
    writer = PredictionLog(tmp_path, flush_interval_seconds=3600, fsync=False)
    reader = PredictionLog(tmp_path, flush_interval_seconds=3600, max_age_seconds=3600)
    expected: dict[str, tuple[int, float]] = {}  # id -> (time, probability) within retention
    old: list[str] = []
    n = 0
    try:
        for round_ in range(2):
            for _ in range(rng.randrange(SEGMENT_PARTS, 2 * SEGMENT_PARTS + 40)):
                rows = rng.randrange(1, 4)
                ids = [f"{n + k:x}-{seed}" for k in range(rows)]
                n += rows
                aged = rng.random() < 0.3
                when = now - (7_200_000 if aged else rng.randrange(1_000, 1_800_000))
                probabilities = [rng.random() for _ in ids]
                writer.record(ids, np.zeros((rows, 2), np.float32), probabilities, [3] * rows,
                              "model_1", 1, time_ms=when)  # fmt: skip
                writer.flush()
                for i, p in zip(ids, probabilities, strict=True):
                    if aged:
                        old.append(i)
                    else:
                        expected[i] = (when, p)
            for i in rng.sample(sorted(expected), 40):
                row = reader.find_recent(i)
                assert row is not None and (row.time_ms, row.probability_up) == expected[i], i
            assert all(reader.find_recent(i) is None for i in rng.sample(old, 20))
            assert reader.find_recent(f"never-{round_}") is None
        # the lookups went through merged segments, or through the summaries alone
        assert bool(reader._segments) == (listed == 0)
    finally:
        reader.close()
        writer.close()


def test_a_disk_lookup_does_not_walk_every_part_within_the_retention(tmp_path) -> None:
    """A day of parts at one every 5 s is ~17,000 within the default retention; a lookup
    checked each part's hashes in turn (10.6 ms of CPU per unknown id at 5,000 parts). Merged
    into segments of SEGMENT_PARTS, twice the parts cost about as much, not twice as much.
    Measured without a clock, as Python calls of one lookup of an unknown id: 2,410 at 600
    parts and 4,810 at 1,200 before (fails before), 399 and 284 now (passes after)."""

    def calls_of_one_lookup(parts: int, directory) -> int:  # type: ignore[no-untyped-def]
        log = PredictionLog(directory, flush_interval_seconds=3600, fsync=False, max_rows=1)
        row = np.zeros((1, 3), np.float32)
        try:
            for k in range(parts):
                log.record([f"live-{k}"], row, [0.5], [3], "model_1", 1)
                log.flush()
            assert log.find_recent("live-0") is not None  # from disk: indexes the parts
            missing, counted = python_calls(lambda: log.find_recent("never-predicted"))
            assert missing is None
            return counted
        finally:
            log.close()

    assert SEGMENT_PARTS == 128
    some = calls_of_one_lookup(600, tmp_path / "some")
    twice = calls_of_one_lookup(1200, tmp_path / "twice")
    print(f"\nPython calls of one disk lookup: {some} at 600 parts, {twice} at 1,200")
    assert twice < 1.5 * some, (some, twice)
