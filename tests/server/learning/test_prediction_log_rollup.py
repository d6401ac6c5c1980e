"""The prediction log's parts stay few: the flusher merges the parts of each ended hour (by the
log's clock) into one part, rows in the order the parts gave them, and a crash at any step of
a merge leaves every row exactly once for readers and after a restart.

Real part files written by real logs, time moved by a real clock file (``CLOCK_FILE``); the
crashes are real child processes killed with SIGKILL at the step under test; the files a lookup
opens are counted by the kernel (inotify ``IN_OPEN`` on the directory)."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from harness import modules_of_child
from learning_helpers import CLOCK_START
from opened_files import Opened

from xylen_server import clock
from xylen_server.learning import part_index, prediction_log
from xylen_server.learning.prediction_log import (
    INDEX_FILE,
    REPLACES_KEY,
    ROLLUP_FILE,
    SCHEMA,
    PredictionLog,
    live_parts,
)

REPO = Path(__file__).resolve().parents[3]
HOUR = 3_600_000
START = CLOCK_START  # a whole hour: the clock_file fixture's start
PREFIX = "0123456789ab"
ROWS = 40
NAME = re.compile(r"part-\d{13}-\d{8}\.parquet")


def open_log(directory: Path, **options: object) -> PredictionLog:
    """A log whose flusher only writes when told, remembering one row in memory (so lookups
    go to the parts) and every row on disk for ten days."""
    values: dict[str, object] = {
        "flush_interval_seconds": 3600,
        "max_rows": 1,
        "max_age_seconds": 10 * 86400,
    }
    values.update(options)
    return PredictionLog(directory, **values)  # type: ignore[arg-type]


def write_parts(
    log: PredictionLog, clock_path: Path, times: list[int], first: int = 0
) -> list[str]:
    """One part of ``ROWS`` rows at each time (the clock set to it); the ids written."""
    ids: list[str] = []
    counter = first
    for at in times:
        clock.write(clock_path, at)
        batch = [f"{PREFIX}-{counter + i:x}" for i in range(ROWS)]
        counter += ROWS
        features = np.arange(ROWS * 3, dtype=np.float32).reshape(ROWS, 3) + np.float32(counter)
        log.record(batch, features, np.linspace(0, 1, ROWS), [1, 2, 3, 3] * (ROWS // 4), "m", 1)
        assert log.flush() is not None
        ids += batch
    return ids


def rows_of(log: PredictionLog) -> list[tuple[object, ...]]:
    return [
        (r.prediction_id, r.time_ms, r.features.tobytes(), r.probability_up, r.signal)
        for r in log.replay_rows()
    ]


def test_an_ended_hour_becomes_one_part_and_every_id_is_found_in_it(
    tmp_path: Path, clock_file: Path
) -> None:
    directory = tmp_path / "log"
    log = open_log(directory)
    minute = 60_000
    first = write_parts(log, clock_file, [START + k * 10 * minute for k in range(5)])
    opened = Opened(directory)
    try:
        # the first hour ended less than a minute ago: nothing to do, not even a listing
        clock.write(clock_file, START + HOUR + 30_000)
        opened.names()
        listings = opened.listings
        assert log.roll_up() is None and log.roll_up() is None
        assert opened.names() == set() and opened.listings == listings
        assert len(log.part_files()) == 5
        second = write_parts(
            log, clock_file, [START + HOUR + 40_000 + k * 20 * minute for k in range(3)], 1000
        )
        third = write_parts(log, clock_file, [START + 2 * HOUR + minute], 2000)
        before = rows_of(log)
        sources = [p.name for p in log.part_files()]
        assert len(sources) == 9
        assert log.find_recent(first[0]) is not None  # lookups know the parts before the merge
        opened.names()
        clock.write(clock_file, START + 3 * HOUR + 2 * minute)
        merged = log.roll_up()  # the oldest ended hour, one a call
        assert merged is not None
        assert set(sources[:5]) <= opened.names() <= set(sources[:5]) | {merged.name}
        assert [p.name for p in log.part_files()] == [merged.name, *sources[5:]]
        again = log.roll_up()
        assert again is not None
        assert log.roll_up() is None  # the third hour is one part: nothing to merge
        parts = [p.name for p in log.part_files()]
        assert parts == [merged.name, again.name, sources[-1]]
        assert sorted(p.name for p in directory.glob("*.parquet")) == parts
        assert all(NAME.fullmatch(name) for name in parts)
        assert merged.name[:18] == sources[0][:18] and again.name[:18] == sources[5][:18]
        assert rows_of(log) == before  # the same rows in the same order
        assert pq.read_schema(merged).remove_metadata() == SCHEMA
        replaced = json.loads(pq.read_schema(merged).metadata[REPLACES_KEY])
        assert replaced == [[name, ROWS] for name in sources[:5]]
        assert pl.read_parquet(directory / "*.parquet").height == len(before)
        assert not (directory / ROLLUP_FILE).exists()
        # the lookups forgot the merged parts and open the one part that holds the id
        held = {entry[3].name for entries in log._ranged.values() for entry in entries}
        assert held.isdisjoint(sources[:8])
        assert set(sources[:8]).isdisjoint(log._summaries)
        opened.names()
        for prediction_id, part in [(first[0], merged), (first[-1], merged), (second[5], again)]:
            row = log.find_recent(prediction_id)
            assert row is not None and row.prediction_id == prediction_id
            assert opened.names() == {part.name}
        log.close()
        # a restart: every id found, opening only the part that holds it
        fresh = open_log(directory)
        opened.names()
        for prediction_id, part in [(first[7], merged), (second[-1], again), (third[3], None)]:
            row = fresh.find_recent(prediction_id)
            assert row is not None and row.prediction_id == prediction_id
            assert opened.names() == {part.name if part else sources[-1]}
        assert all(fresh.find_recent(i) is not None for i in first + second + third)
        assert rows_of(fresh) == before
        fresh.close()
    finally:
        opened.close()


def test_the_flusher_merges_by_itself_and_leaves_a_part_across_the_hour_alone(
    tmp_path: Path, clock_file: Path
) -> None:
    directory = tmp_path / "log"
    log = open_log(directory)
    early = write_parts(log, clock_file, [START + 1000, START + 2000, START + 3000])
    # one part with rows of both hours: it stays as it is, after the merged part
    clock.write(clock_file, START + HOUR - 1)
    log.record([f"{PREFIX}-f00"], np.zeros((1, 3), np.float32), [0.5], [3], "m", 1)
    clock.write(clock_file, START + HOUR + 1)
    log.record([f"{PREFIX}-f01"], np.zeros((1, 3), np.float32), [0.5], [3], "m", 1)
    across = log.flush()
    assert across is not None
    before = rows_of(log)
    log.close()
    clock.write(clock_file, START + 3 * HOUR)
    log = open_log(directory, flush_interval_seconds=0.05)
    write_parts(log, clock_file, [START + 3 * HOUR], 5000)  # a part: this log writes
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(log.part_files()) > 3:
        time.sleep(0.05)
    parts = log.part_files()
    assert len(parts) == 3 and parts[1] == across
    assert rows_of(log)[: len(before)] == before and len(early) == 3 * ROWS
    log.close()


def test_no_rollup_when_it_is_off(tmp_path: Path, clock_file: Path) -> None:
    log = open_log(tmp_path / "log", rollup_seconds=0)
    write_parts(log, clock_file, [START, START + 1000, START + 2000])
    clock.write(clock_file, START + 5 * HOUR)
    assert log.roll_up() is None and len(log.part_files()) == 3
    log.close()


CHILD = """
import sys, time
from pathlib import Path
import numpy as np
from xylen_server import clock
from xylen_server.learning import part_rollup, prediction_log

directory, clock_path, stop_at = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
clock.use_file(clock_path)
log = prediction_log.PredictionLog(
    directory, flush_interval_seconds=3600, max_rows=1, max_age_seconds=10 * 86400
)
start = int(clock_path.read_text())
for k, at in enumerate([start, start + 60_000, start + 120_000, start + 3_600_000]):
    clock.write(clock_path, at)
    ids = [f"0123456789ab-{40 * k + i:x}" for i in range(40)]
    log.record(ids, np.full((40, 3), k, np.float32), [0.5] * 40, [3] * 40, "m", 1)
    assert log.flush() is not None
clock.write(clock_path, start + 2 * 3_600_000)

def stop(step):
    if step == stop_at:
        print("stopped", flush=True)
        time.sleep(600)

part_rollup._rollup_hook = stop
log.roll_up()
print("done", flush=True)
"""


def crash_at(step: str, directory: Path, clock_path: Path) -> None:
    """Run a log in a child that merges an hour and SIGKILL it at ``step`` of the merge."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(clock_path), step],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "stopped"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


EXPECTED = [f"{PREFIX}-{i:x}" for i in range(160)]


@pytest.mark.slow
def test_killed_between_the_rename_and_the_deletes_every_row_is_there_once(
    tmp_path: Path, clock_file: Path
) -> None:
    directory = tmp_path / "log"
    crash_at("renamed", directory, clock_file)
    on_disk = sorted(p.name for p in directory.glob("part-*.parquet"))
    assert len(on_disk) == 5 and (directory / ROLLUP_FILE).exists()  # 3 merged, 1 later, 1 new
    merged = json.loads((directory / ROLLUP_FILE).read_text())["part"]
    live = [p.name for p in live_parts(directory)]  # a reader before any restart
    assert merged in live and len(live) == 2
    assert pl.read_parquet([directory / n for n in live])["prediction_id"].to_list() == EXPECTED
    log = open_log(directory)  # the restart finishes the merge
    assert [p.name for p in log.part_files()] == live
    assert sorted(p.name for p in directory.glob("part-*.parquet")) == live
    assert not (directory / ROLLUP_FILE).exists()
    assert [r[0] for r in rows_of(log)] == EXPECTED
    assert all(log.find_recent(i) is not None for i in EXPECTED)
    log.close()


@pytest.mark.slow
def test_killed_before_the_rename_the_parts_stay_and_merge_later(
    tmp_path: Path, clock_file: Path
) -> None:
    directory = tmp_path / "log"
    crash_at("journal", directory, clock_file)
    assert len(list(directory.glob("_rollup-*.tmp"))) == 1 and (directory / ROLLUP_FILE).exists()
    parts = [p.name for p in live_parts(directory)]
    assert len(parts) == 4
    log = open_log(directory)
    assert not list(directory.glob("*.tmp"))
    assert [p.name for p in log.part_files()] == parts
    assert [r[0] for r in rows_of(log)] == EXPECTED
    write_parts(log, clock_file, [START + 2 * HOUR], 160)  # this log writes: it may merge
    merged = log.roll_up()
    assert merged is not None and len(log.part_files()) == 3
    assert [r[0] for r in rows_of(log)] == [f"{PREFIX}-{i:x}" for i in range(200)]
    assert all(log.find_recent(i) is not None for i in EXPECTED)
    log.close()


IMPORTS_CHILD = """
import json, sys
from pathlib import Path
import numpy as np
import xylen_server.server  # everything `python -m xylen_server` imports
from xylen_server.learning.prediction_log import PredictionLog

log = PredictionLog(Path(sys.argv[1]), flush_interval_seconds=3600, max_age_seconds=10**9)
for k in range(3):  # three parts of an hour long past (by the wall clock)
    ids = [f"0123456789ab-{k:x}", f"caller-{k}"]
    log.record(ids, np.zeros((2, 3), np.float32), [0.5] * 2, [3] * 2, "m", 1,
               time_ms=1_700_000_000_000 + k)
    assert log.flush() is not None
assert log.roll_up() is not None and len(log.part_files()) == 1
assert log.find_recent("caller-0") is not None
assert [r.prediction_id for r in log.replay_rows()][-1] == "caller-2"
log.close()
print(json.dumps(sorted(sys.modules)))
"""


def test_the_rollup_imports_neither_pandas_nor_arrow_compute(tmp_path: Path) -> None:
    """The merge runs in the server (see ``xylen_server/learning/arrow_columns.py``)."""
    modules = modules_of_child(IMPORTS_CHILD, str(tmp_path / "log"))
    assert "pyarrow.parquet" in modules
    unwanted = {"pandas", "pyarrow.compute", "pyarrow.dataset", "polars"}
    assert modules.isdisjoint(unwanted), sorted(modules & unwanted)


def index_lines(directory: Path) -> list[str]:
    return [json.loads(line)["part"] for line in (directory / INDEX_FILE).read_text().splitlines()]


def test_the_index_lets_go_of_the_lines_of_merged_parts(
    tmp_path: Path, clock_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_parts.index`` got a line a part for good (~17,000 a day), all read by a restart's
    first lookup; merged parts' lines are dropped (here at once; by default past 4,096)."""
    monkeypatch.setattr(part_index, "INDEX_REWRITE_LINES", 1)
    directory = tmp_path / "log"
    log = open_log(directory)
    ids = write_parts(log, clock_file, [START + k * 60_000 for k in range(6)])
    ids += write_parts(log, clock_file, [START + HOUR + k * 60_000 for k in range(6)], 240)
    ids += write_parts(log, clock_file, [START + 2 * HOUR + 60_000], 480)
    with open(directory / INDEX_FILE, "a") as index:
        index.write('{"part": "torn')
    assert len((directory / INDEX_FILE).read_text().splitlines()) == 14
    clock.write(clock_file, START + 3 * HOUR)
    assert log.roll_up() is not None
    assert sorted(index_lines(directory)) == [p.name for p in log.part_files()]
    assert log.roll_up() is not None and log.roll_up() is None
    # the second merge's 6 lines are fewer than the 8 kept: they wait for more
    assert set(index_lines(directory)) >= {p.name for p in log.part_files()}
    log.close()
    fresh = open_log(directory)
    opened = Opened(directory)
    try:
        for prediction_id in ids[::7]:
            row = fresh.find_recent(prediction_id)
            assert row is not None and row.prediction_id == prediction_id
            assert len(opened.names()) == 1  # the index names its holder
    finally:
        opened.close()
        fresh.close()


def test_lookups_while_hours_are_merged_find_every_id(tmp_path: Path, clock_file: Path) -> None:
    """Feedback looks ids up on other threads while the flusher merges: a lookup sees the parts
    or the merged part (one that opens a part deleted meanwhile looks once more)."""
    directory = tmp_path / "log"
    log = open_log(directory)
    ids: list[str] = []
    for hour in range(6):
        times = [START + hour * HOUR + k * 60_000 for k in range(8)]
        ids += write_parts(log, clock_file, times, hour * 8 * ROWS)
    clock.write(clock_file, START + 7 * HOUR)
    # another log on the directory (a tool), which knows the parts from before the merges
    other = open_log(directory)
    assert other.find_recent(ids[0]) is not None
    stop = threading.Event()
    missed: list[str] = []
    looked = [0, 0]

    def look(worker: int) -> None:
        rng = random.Random(worker)
        while not stop.is_set():
            prediction_id = rng.choice(ids)
            row = log.find_recent(prediction_id)
            if row is None or row.prediction_id != prediction_id:
                missed.append(prediction_id)
            looked[worker] += 1

    threads = [threading.Thread(target=look, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    try:
        merged = 0
        while log.roll_up() is not None:
            merged += 1
            time.sleep(0.02)  # let the lookups run between merges too
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert merged == 6 and len(log.part_files()) == 6
    assert missed == [] and min(looked) > 0
    assert [r[0] for r in rows_of(log)] == ids
    # its parts are gone: it looks once more, finds the merged parts and every id in them
    assert all(other.find_recent(i) is not None for i in ids[::5])
    other.close()
    log.close()


def test_a_lookup_whose_part_is_merged_away_before_it_opens_it_looks_once_more(
    tmp_path: Path, clock_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the threads above rarely hit, made to happen: the lookup chose its parts, then
    the merge deleted them, then it opens one."""
    directory = tmp_path / "log"
    log = open_log(directory)
    ids = write_parts(log, clock_file, [START + k * 60_000 for k in range(4)])
    clock.write(clock_file, START + 2 * HOUR)
    assert log.find_recent(ids[0]) is not None  # the lookups know the four parts
    real = prediction_log._find_in_part
    merged: list[Path | None] = []

    def merge_first(path: Path, prediction_id: str) -> object:
        if not merged:
            merged.append(log.roll_up())
        return real(path, prediction_id)

    monkeypatch.setattr(prediction_log, "_find_in_part", merge_first)
    row = log.find_recent(ids[-2])  # (the last row is still in memory)
    assert merged[0] is not None and row is not None and row.prediction_id == ids[-2]
    log.close()


def test_a_part_that_cannot_be_deleted_after_a_merge_is_never_read_twice(
    tmp_path: Path, clock_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merged part is in place but one of its parts refuses to go (a fault made with a
    failing unlink): reads leave it out, and the next merge deletes it before anything else."""
    directory = tmp_path / "log"
    log = open_log(directory)
    ids = write_parts(log, clock_file, [START + k * 60_000 for k in range(3)])
    ids += write_parts(log, clock_file, [START + HOUR + k * 60_000 for k in range(3)], 120)
    stuck = log.part_files()[1]
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == stuck:
            raise PermissionError(13, "Permission denied", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    clock.write(clock_file, START + 3 * HOUR)
    first = log.roll_up()
    assert first is not None and stuck.exists() and (directory / ROLLUP_FILE).exists()
    assert stuck not in log.part_files()
    assert [r[0] for r in rows_of(log)] == ids
    # still stuck: the next merge does not start (its journal would hide nothing)
    with pytest.raises(PermissionError):
        log.roll_up()
    assert [r[0] for r in rows_of(log)] == ids
    monkeypatch.setattr(Path, "unlink", real_unlink)
    second = log.roll_up()  # the window is tried again, after the leftover is deleted
    assert second is not None and not stuck.exists()
    assert [p.name for p in log.part_files()] == [first.name, second.name]
    assert [r[0] for r in rows_of(log)] == ids
    log.close()


def test_a_replay_while_hours_are_merged_reads_every_row_once(
    tmp_path: Path, clock_file: Path
) -> None:
    """A replay started before the merges and read on after them: the parts it listed are
    gone; it reads their rows from the merged parts, less those it read already."""
    directory = tmp_path / "log"
    log = open_log(directory)
    ids = write_parts(log, clock_file, [START + k * 60_000 for k in range(4)])
    ids += write_parts(log, clock_file, [START + HOUR + k * 60_000 for k in range(4)], 160)
    replay = log.replay_rows()
    read = [next(replay).prediction_id for _ in range(ROWS + 5)]  # into the second part
    clock.write(clock_file, START + 3 * HOUR)
    assert log.roll_up() is not None and log.roll_up() is not None
    assert len(log.part_files()) == 2
    read += [row.prediction_id for row in replay]
    assert read == ids
    # a merged part listed beside a part it replaces (the journal gone) skips that part's rows
    other = open_log(tmp_path / "other")
    more = write_parts(other, clock_file, [START + k * 60_000 for k in range(3)], 1000)
    first = other.part_files()[0]
    kept = first.read_bytes()
    clock.write(clock_file, START + 3 * HOUR)
    assert other.roll_up() is not None
    first.write_bytes(kept)
    assert len(other.part_files()) == 2
    assert [row.prediction_id for row in other.replay_rows()] == more
    other.close()
    log.close()


def test_read_while_an_hour_is_merged_reads_every_row_once(
    tmp_path: Path, clock_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``read()`` listed the parts, then a merge (the flusher's, or another process's) deleted
    them before it opened them: it reads their rows from the merged part, each once, as
    ``replay_rows`` does. Before, it failed with FileNotFoundError."""
    directory = tmp_path / "log"
    log = open_log(directory)
    ids = write_parts(log, clock_file, [START + k * 60_000 for k in range(4)])
    ids += write_parts(log, clock_file, [START + HOUR + k * 60_000 for k in range(2)], 160)
    quiet = log.read()
    assert quiet.equals(pl.read_parquet(log.part_files()))  # as a glob reads it, when quiet
    clock.write(clock_file, START + 3 * HOUR)
    listing = log.part_files
    merged: list[Path | None] = []

    def list_then_merge() -> list[Path]:
        listed = listing()
        if not merged:  # the first hour's four parts merged away between listing and reading
            merged.append(log.roll_up())
        return listed

    monkeypatch.setattr(log, "part_files", list_then_merge)
    frame = log.read()
    assert merged[0] is not None and len(listing()) == 3
    assert frame["prediction_id"].to_list() == ids
    assert frame.equals(quiet)
    monkeypatch.undo()
    # a merged part listed beside a part it replaces (the journal gone): that part's rows once
    first = merged[0]
    source = directory / json.loads(pq.read_schema(first).metadata[REPLACES_KEY])[0][0]
    pq.write_table(pq.read_table(first).slice(0, ROWS).replace_schema_metadata(), source)
    assert len(log.part_files()) == 4
    assert log.read()["prediction_id"].to_list() == ids
    log.close()
