"""The first Feedback lookup after a restart opens only the prediction-log parts that can hold
the id, not every part: each part's summary (its newest time, the counter range of the server's
own ids, a hash of any other id) is kept in ``parts.index`` beside it, written as the part is.
Real part files written by a real log, a fresh log on the same directory as a restarted server
has; the files opened are counted by the kernel (inotify ``IN_OPEN`` on the directory), so any
way of opening a part counts. Every row is still found, and a log written before the index (no
``parts.index``) is read once and indexed for the next restart."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from learning_helpers import CLOCK_START
from opened_files import Opened

from xylen_server.learning.part_index import MAX_LISTED_IDS, SERVER_ID, _server_ids
from xylen_server.learning.prediction_log import INDEX_FILE, PredictionLog

PARTS = 12
ROWS = 300
FIRST = "0123456789ab"
SECOND = "fedcba987654"


def _write(directory: Path) -> tuple[dict[str, str], list[str]]:
    """``PARTS`` parts of the server's ids (two processes' prefixes), one part with a few ids
    of other shapes, one with more than a summary lists. Returns id -> part name, and the
    names of the parts whose summary cannot list their ids."""
    log = PredictionLog(directory, flush_interval_seconds=3600, max_rows=10_000)
    now = time.time_ns() // 1_000_000
    features = np.zeros((ROWS, 3), np.float32)
    holder: dict[str, str] = {}
    unlisted: list[str] = []
    counter = 0
    try:
        batches: list[list[str]] = []
        for k in range(PARTS):
            prefix = FIRST if k < PARTS // 2 else SECOND  # the server restarted halfway
            if k == PARTS // 2:
                counter = 0
            batches.append([f"{prefix}-{counter + i:x}" for i in range(ROWS)])
            counter += ROWS
        batches.append(["caller-1", "ü-π-€", "0123456789ab-00ff", "short-1", "pad\0"])
        batches.append([f"client-{i}" for i in range(MAX_LISTED_IDS + 10)])
        for k, ids in enumerate(batches):
            rows = np.zeros((len(ids), 3), np.float32) if len(ids) != ROWS else features
            log.record(ids, rows, [0.5] * len(ids), [3] * len(ids), "model_1", 1,
                       time_ms=now - 60_000 + k)  # fmt: skip
            part = log.flush()
            assert part is not None
            holder.update(dict.fromkeys(ids, part.name))
            if k == len(batches) - 1:
                unlisted.append(part.name)
    finally:
        log.close()
    return holder, unlisted


def test_a_lookup_after_a_restart_opens_only_the_parts_that_can_hold_the_id(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "log"
    holder, unlisted = _write(directory)
    assert (directory / INDEX_FILE).is_file()
    opened = Opened(directory)
    restarted = PredictionLog(directory, flush_interval_seconds=3600, max_rows=10)
    try:
        first = f"{FIRST}-{ROWS + 7:x}"  # in the second part
        row, names = opened.during(lambda: restarted.find_recent(first))
        assert row is not None and row.prediction_id == first  # type: ignore[attr-defined]
        # Before: every part (14) at the first lookup. Now: the part holding the id, and the
        # one part whose ids are too many to summarise (indexed once by reading it).
        assert names == {holder[first], *unlisted}, sorted(names)
        rng = random.Random(7)
        for prediction_id in rng.sample(sorted(holder), 400) + list(holder)[-1025:-1015]:
            row, names = opened.during(lambda i=prediction_id: restarted.find_recent(i))
            assert row is not None and row.prediction_id == prediction_id  # type: ignore[attr-defined]
            assert names == {holder[prediction_id]}, (prediction_id, sorted(names))
        for unknown in (f"{FIRST}-{10 * PARTS * ROWS:x}", "abcdefabcdef-1", "never-said"):
            row, names = opened.during(lambda i=unknown: restarted.find_recent(i))
            assert row is None and names == set(), (unknown, sorted(names))
    finally:
        restarted.close()
        opened.close()


def test_a_log_without_an_index_is_read_once_and_indexed(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    holder, unlisted = _write(directory)
    (directory / INDEX_FILE).unlink()  # a log written before the index
    opened = Opened(directory)
    try:
        older = PredictionLog(directory, flush_interval_seconds=3600, max_rows=10)
        some = f"{SECOND}-{5:x}"
        row, names = opened.during(lambda: older.find_recent(some))
        older.close()
        assert row is not None and names == set(holder.values())  # every part, once
        restarted = PredictionLog(directory, flush_interval_seconds=3600, max_rows=10)
        try:
            for prediction_id in sorted(holder)[::7]:
                row, names = opened.during(lambda i=prediction_id: restarted.find_recent(i))
                assert row is not None and row.prediction_id == prediction_id  # type: ignore[attr-defined]
                assert names <= {holder[prediction_id], *unlisted}, sorted(names)
        finally:
            restarted.close()
    finally:
        opened.close()


def test_the_shape_of_the_servers_ids_is_read_as_the_pattern_says() -> None:
    """The summary reads ids with numpy over the column's buffers: the same ids as
    ``SERVER_ID`` match, and the same counters."""
    rng = random.Random(3)
    alphabet = "0123456789abcdefABg-ü"
    ids = [f"{FIRST}-{rng.randrange(1 << 60):x}" for _ in range(200)]
    ids += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 32))) for _ in range(500)]
    ids += [f"{FIRST}-0", f"{FIRST}-00", f"{FIRST}-", f"{FIRST}-{'f' * 15}", f"{FIRST}-{'f' * 16}"]
    ids += [f"{FIRST[:11]}g-1", f"{FIRST}x1", f"{FIRST}-1\0"]
    column = pa.array(["offset", *ids]).slice(1)  # a sliced array: its offset is read
    check(ids, *_server_ids(column))
    # the ring's fixed-width copy, as a flush hands it over (ids that are held inline)
    inline = [i for i in ids if len(i.encode()) <= 32 and not i.endswith("\0")]
    fixed = np.array([i.encode() for i in inline], dtype="S32")
    check(inline, *_server_ids(pa.array(inline), fixed))


def check(ids: list[str], prefixes: np.ndarray, counters: np.ndarray, ours: np.ndarray) -> None:
    for i, prediction_id in enumerate(ids):
        match = SERVER_ID.fullmatch(prediction_id)
        assert bool(ours[i]) == (match is not None), prediction_id
        if match is not None:
            assert prefixes[i].decode() == match.group(1)
            assert int(counters[i]) == int(match.group(2), 16), prediction_id


def _a_part_a_minute(
    log: PredictionLog, clock_file: Path, start_ms: int, minutes: int
) -> Iterator[tuple[int, list[str], str]]:
    """Flush a part a minute by the clock file (``start_ms`` + 1, + 2, ... minutes), each of
    four ids: three of the server's shape, one a caller's. Yields (minute, ids, part name)."""
    now = start_ms
    for k in range(minutes):
        now += 60_000
        clock_file.write_text(str(now))
        ids = [f"{FIRST}-{3 * k + i:x}" for i in range(3)] + [f"caller-{k}"]
        log.record(ids, np.zeros((4, 2), np.float32), [0.5] * 4, [3] * 4, "model_1", 1)
        part = log.flush()
        assert part is not None
        yield k, ids, part.name


def test_what_is_known_of_parts_past_the_retention_is_let_go(
    tmp_path: Path, clock_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server running for weeks summarises ~17,000 parts a day: the entries of parts that
    aged past the retention are dropped (once they have doubled), and the parts within it are
    still found without opening any other. Time moves by a real clock file (CLOCK_FILE)."""
    from xylen_server.learning import part_index

    monkeypatch.setattr(part_index, "SUMMARY_ENTRIES", 8)  # 4,096: a few parts show it
    directory = tmp_path / "log"
    log = PredictionLog(directory, flush_interval_seconds=3600, max_age_seconds=600, max_rows=1)
    opened = Opened(directory)
    try:
        said: dict[str, str] = {}
        # a part a minute for 40 minutes, the retention 10
        for k, ids, name in _a_part_a_minute(log, clock_file, CLOCK_START, 40):
            said.update(dict.fromkeys(ids, name))
            for i in (ids[0], ids[-1], f"caller-{max(0, k - 5)}"):
                row, names = opened.during(lambda i=i: log.find_recent(i))
                assert row is not None and names <= {said[i]}, (k, i, sorted(names))
            held = sum(map(len, log._ranged.values())) + sum(map(len, log._listed.values()))
            # two entries a part, 11 or 12 parts within the retention, at most twice that kept
            assert held <= 2 * (2 * 12) + 8, (k, held)  # without dropping: 80 at the end
        old = f"{FIRST}-{3:x}"  # 39 minutes old
        row, names = opened.during(lambda: log.find_recent(old))
        assert row is None and names == set()
    finally:
        log.close()
        opened.close()


def test_a_restart_keeps_only_the_summaries_of_parts_within_the_retention(
    tmp_path: Path, clock_file: Path
) -> None:
    """The index lists every part ever written (a month of a server's parts: ~500,000 lines):
    the first lookup after a restart keeps the summaries of the parts within the retention
    only, marks the older parts seen, and opens none of them. Time moves by a real clock
    file (CLOCK_FILE)."""
    directory = tmp_path / "log"
    said: dict[str, str] = {}
    log = PredictionLog(directory, flush_interval_seconds=3600, max_age_seconds=600)
    try:
        # a part a minute for 40 minutes, the retention 10
        for _, ids, name in _a_part_a_minute(log, clock_file, CLOCK_START, 40):
            said.update(dict.fromkeys(ids, name))
    finally:
        log.close()
    index_lines = (directory / INDEX_FILE).read_text().splitlines()
    assert len(index_lines) == 40

    again = PredictionLog(directory, flush_interval_seconds=3600, max_age_seconds=600)
    opened = Opened(directory)
    try:
        recent = f"{FIRST}-{3 * 38:x}"  # two minutes old
        row, names = opened.during(lambda: again.find_recent(recent))
        assert row is not None and row.prediction_id == recent
        assert names == {said[recent]}
        # 10 or 11 parts within the 10 minutes: the 29 older ones are seen, not held
        assert 10 <= len(again._summaries) <= 11, sorted(again._summaries)
        assert all(said[f"caller-{k}"] in again._disk_seen for k in range(40))
        for old in (f"{FIRST}-{3:x}", "caller-2"):  # 38 minutes old
            row, names = opened.during(lambda old=old: again.find_recent(old))
            assert row is None and names == set()
        row, names = opened.during(lambda: again.find_recent("caller-37"))
        assert row is not None and names == {said["caller-37"]}
    finally:
        again.close()
        opened.close()
