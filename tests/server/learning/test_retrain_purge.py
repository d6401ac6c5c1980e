"""The gate's window is never scored by a candidate that learned from the prices its labels are
made of: the samples whose outcomes closed within the model's label horizon before the window
are purged from training.

A label looks ``horizon`` bars ahead, so a sample just before the window shares its future with
the window's first samples: what it "knows" about the window is look-ahead. The job below is
given that case taken to the limit: the samples in the gap and the window follow one rule a
tree learns at once (labels decided by feature 0), everything
older is noise. Trained on the gap, a candidate scores the window as if it had seen it; purged,
it has only the noise. Real job, real LightGBM, real SQLite store."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from harness import write_model
from learning_helpers import (
    feedback_records,
    job_spec,
    label_meta,
    store_ruled_samples,
)

from training.metadata import ModelMetadata
from xylen_server.auth import ADMIN_TOKEN_IDENTITY
from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.job import JobFailed
from xylen_server.learning.job.run import purge_before, run

HOUR_MS = 3_600_000
START_MS = 1_700_000_000_000


def test_the_samples_in_the_gap_before_the_window_are_not_trained_on(
    tmp_path, candles, feature_rows
):
    serving = write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=30)
    # A model labelling 100-hour moves: its last 100 samples before the window share prices
    # with the window's labels.
    gap = 100
    dataclasses.replace(ModelMetadata.read(serving), horizon=gap, interval="1h").write(serving)
    # holdout 0.2 of 500: 300 older samples, the gap, the window; early stopping on the last 45
    # of the 300 and the same gap before those (so 155 are fitted on)
    total, window = 500, 100
    recent = np.arange(total - window - gap, total)  # the gap and the window
    data = tmp_path / "data"
    store_ruled_samples(data, feature_rows, total, recent, 7, START_MS)
    spec = job_spec(tmp_path, serving, data, "purge", "full")
    result = run(spec)
    gate = result["gate"]
    assert gate["holdout_samples"] == window
    assert result["purged_before_window"] == gap
    assert result["early_stopping_rows"] == 45
    assert result["purged_before_stopping"] == gap
    assert result["training_rows"] == total - window - 2 * gap  # the model lists no history
    # Trained on the gap the candidate scored the window at AUC 0.98 and was promoted (before
    # this change); purged, it has only noise to go on.
    assert gate["candidate_auc"] < 0.7 and not gate["passed"], gate


def test_the_gap_is_the_model_s_bars_or_the_samples_shortest_step():
    meta = label_meta(horizon=3)
    closes = START_MS + np.array([0, 5, 7, 7, 20]) * HOUR_MS
    assert purge_before(meta, START_MS, closes) == START_MS - 3 * HOUR_MS  # the horizon
    assert purge_before(dataclasses.replace(meta, interval="15m"), START_MS, closes) == (
        START_MS - 3 * 15 * 60_000
    )
    # No interval in the metadata: the shortest step between distinct close times (2 h here).
    unknown = dataclasses.replace(meta, interval="")
    assert purge_before(unknown, START_MS, closes) == START_MS - 3 * 2 * HOUR_MS
    assert purge_before(unknown, START_MS, closes[:1]) == START_MS  # one time: no step known


def test_outcomes_that_all_closed_at_once_leave_nothing_to_train_on_and_say_so(
    tmp_path, candles, feature_rows
):
    """600 outcomes closing within the same second (what the demo sent before it ran the hours
    on a simulated clock): every sample before the window is in the gap, so the job fails with
    the reason instead of training on look-ahead or reporting an empty label set. The model
    names its 1h bars, as every model ``make train`` writes does."""
    serving = write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=30)
    dataclasses.replace(ModelMetadata.read(serving), interval="1h").write(serving)
    data = tmp_path / "data"
    labels = np.random.default_rng(3).integers(0, 2, 600)
    with FeedbackStore(data, compact_rows=0) as store:
        records = feedback_records(feature_rows[:600], labels, "s", ADMIN_TOKEN_IDENTITY, START_MS)
        for i, record in enumerate(records):
            store.append(
                dataclasses.replace(
                    record,
                    close_time_ms=START_MS + i,  # a millisecond apart
                    received_time_ms=START_MS + 1000 + i,
                )
            )
    spec = job_spec(tmp_path, serving, data, "burst", "incremental")
    with pytest.raises(
        JobFailed, match=r"nothing to train on: the 480 samples before the held-out"
    ):
        run(spec)
    assert not (tmp_path / "candidate").exists()
