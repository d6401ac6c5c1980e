"""The retrain job's early stopping gets the same gap as the gate's window: the rows whose
outcomes closed within the model's label horizon before the first early-stopping row are
neither fitted on nor stopped on (:func:`xylen_server.learning.job.run.early_stopping_split`,
with :func:`~xylen_server.learning.job.run.purge_before`, the gate window's rule).

A label is the move over ``horizon`` bars up to its close, so the rows just before the stopping
rows share prices with them; fitted on, they tell the stopping decision what the stopping rows
hold. The job below is that case taken to the limit: the stopping rows and the ``horizon`` rows
before them follow one rule a tree learns at once (labels decided by feature 0), everything
older is noise. Fitted on the gap, the early stopping sees the validation loss fall round after
round and keeps many trees; purged, the model has only noise to fit and stops at once. Real job,
real LightGBM, real SQLite store."""

from __future__ import annotations

import dataclasses

import numpy as np
from harness import write_model
from learning_helpers import (
    job_spec,
    label_meta,
    store_ruled_samples,
)

from training.metadata import ModelMetadata
from xylen_server.learning.job.run import run

HOUR_MS = 3_600_000
START_MS = 1_700_000_000_000


def test_the_rows_in_the_gap_before_the_early_stopping_rows_are_purged(
    tmp_path, candles, feature_rows
):
    serving = write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=30)
    gap = 60  # a model labelling 60-hour moves
    dataclasses.replace(ModelMetadata.read(serving), horizon=gap, interval="1h").write(serving)
    # 300 samples an hour apart: the window is the last 60 (holdout 0.2), the 60 before it are
    # the window's gap; of the 180 left, the last 27 (15 %) stop early, the 60 before them are
    # their gap, and 93 are fitted on.
    total, window, stopping = 300, 60, 27
    pool = total - window - gap
    fitted = pool - stopping - gap
    ruled = np.arange(fitted, pool)  # the stopping rows' gap and the stopping rows
    data = tmp_path / "data"
    store_ruled_samples(data, feature_rows, total, ruled, 11, START_MS)
    result = run(job_spec(tmp_path, serving, data, "stopping-purge", "full"))
    assert result["status"] == "ok"
    assert result["purged_before_window"] == gap
    assert result["early_stopping_rows"] == stopping
    assert result["purged_before_stopping"] == gap
    assert result["training_rows"] == fitted + stopping  # the model lists no history
    # Fitted on the gap (before this change) the early stopping kept 59 trees: the rule it had
    # learned from the gap kept improving the stopping rows' loss. Purged, nothing fitted on
    # predicts the stopping rows, and it stops within the first rounds (6 trees).
    assert result["trees"] <= 20, result


def test_the_split_purges_by_close_time_whatever_the_row_order():
    """Rows given out of time order (history rows, then feedback that closed among them): the
    stopping rows are the most recent by close time, the purge counts the rows within the
    horizon before the first of them, and what is left is fitted on, oldest first."""
    from xylen_server.learning.job.run import early_stopping_split

    closes = START_MS + np.arange(200) * HOUR_MS
    shuffled = np.random.default_rng(5).permutation(200)
    fit, valid, purged = early_stopping_split(label_meta(horizon=7), closes[shuffled], closes)
    assert len(valid) == 30  # 15 % of 200
    assert sorted(closes[shuffled][valid]) == list(closes[170:])
    assert purged == 7
    assert list(closes[shuffled][fit]) == list(closes[:163])  # in time order
    # Two outcomes a bar closing together: the horizon is bars, not rows.
    doubled = np.repeat(closes[:100], 2)
    fit, valid, purged = early_stopping_split(label_meta(horizon=4), doubled, doubled)
    assert len(valid) == 30 and purged == 8 and len(fit) == 200 - 30 - 8
    # No interval named: the samples' shortest step (here 1 h) is the bar.
    fit, valid, purged = early_stopping_split(label_meta(horizon=3, interval=""), closes, closes)
    assert purged == 3
    # Under 120 rows: no early stopping, every row fitted on, none purged.
    fit, valid, purged = early_stopping_split(label_meta(horizon=3), closes[:119], closes)
    assert len(fit) == 119 and len(valid) == 0 and purged == 0
