"""The feedback store against a trivially correct model (a dict of the first record stored for
each id): concurrent appends with repeated ids, compactions at any point and reopenings, over
many seeds. Every acknowledged record is read back exactly once, with the values of its first
append; ``duplicate`` and ``stored_samples`` answer what the model says; ``in`` agrees."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest

from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.samples import FeedbackRecord


def _record(prediction_id: str, value: int) -> FeedbackRecord:
    return FeedbackRecord(
        prediction_id, "model_1", 1, np.full(3, value, np.float32), 0.5, 1, float(value),
        0.001 * value, 1_700_000_000_000 + value, 1_700_000_001_000 + value, value % 2,
    )  # fmt: skip


def _append(
    store: FeedbackStore, pid: str, value: int, answers: list[tuple[str, int, bool, int]]
) -> None:
    result = store.append(_record(pid, value))
    answers.append((pid, value, result.duplicate, result.stored_samples))  # list.append: atomic


@pytest.mark.parametrize("seed", range(6))
def test_appends_compactions_and_reopenings_agree_with_a_dict(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    ids = [f"id-{k}" if k % 5 else f"ü-{k}-€" for k in range(rng.randrange(60, 140))]
    stored: dict[str, int] = {}  # id -> the value of the first record acknowledged for it
    store = FeedbackStore(tmp_path, compact_rows=rng.choice([0, 3, 7, 25]), compact_on_close=False)
    value = 0
    try:
        for _ in range(rng.randrange(8, 16)):
            step = rng.random()
            if step < 0.15:
                store.close()
                store = FeedbackStore(
                    tmp_path, compact_rows=rng.choice([0, 5]), compact_on_close=rng.random() < 0.5
                )
                continue
            if step < 0.3:
                store.compact()
                continue
            # A burst of concurrent appends, some ids repeated (within the burst and earlier).
            burst = [rng.choice(ids) for _ in range(rng.randrange(1, 40))]
            values = list(range(value, value + len(burst)))
            value += len(burst)
            answers: list[tuple[str, int, bool, int]] = []
            threads = [
                threading.Thread(target=_append, args=(store, pid, v, answers))
                for pid, v in zip(burst, values, strict=True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            before = len(stored)
            new = [a for a in answers if not a[2]]
            # one new record per id not stored before the burst, whichever append came first
            assert sorted(pid for pid, _, _, _ in new) == sorted(set(burst) - set(stored))
            for pid, v, _, _ in new:
                stored[pid] = v
            assert sorted(count for _, _, _, count in new) == list(
                range(before + 1, len(stored) + 1)
            )
            assert all(count <= len(stored) for _, _, dup, count in answers if dup)
            assert store.count() == len(stored)
            probe = rng.choice(ids)
            assert (probe in store) == (probe in stored)
        frame = store.read_samples()
        read = dict(zip(frame["prediction_id"].to_list(), frame["pnl"].to_list(), strict=True))
        assert len(read) == frame.height  # each id once
        assert read == {pid: float(v) for pid, v in stored.items()}
    finally:
        store.close()
