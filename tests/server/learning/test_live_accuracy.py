"""The live accuracy the retrain trigger reads is the serving model's own: outcomes of calls a
replaced model made (they arrive a horizon after the call, so after a swap) are stored as
samples but do not count towards it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from learning_helpers import learning_settings

from xylen_server.learning.feedback import FeedbackLoop


def _model(version: int) -> SimpleNamespace:
    meta = SimpleNamespace(
        name="model_1", version=version, feature_names=["a", "b", "c"], fee=0.0,
        label_threshold=0.0,
    )  # fmt: skip
    return SimpleNamespace(meta=meta)


def test_outcomes_of_the_replaced_models_calls_do_not_count(tmp_path: Path) -> None:
    loop = FeedbackLoop(learning_settings(tmp_path, retrain_accuracy_window=10))
    try:
        v1_ids = [f"v1-{i}" for i in range(10)]
        rows, up, buy = np.ones((10, 3), np.float32), np.full(10, 0.9), np.ones(10, np.int8)
        loop.log.record(v1_ids, rows, up, buy, "model_1", 1)
        loop.reset(0)  # v2 promoted
        v2_ids = [f"v2-{i}" for i in range(10)]
        loop.log.record(v2_ids, rows, up, buy, "model_1", 2)
        now = int(time.time())

        async def outcomes(ids: list[str]) -> None:
            for prediction_id in ids:  # the price went down: every call was wrong
                await loop.feedback(_model(2), prediction_id, -1.0, -0.01, (now, 0), None, side=1)

        asyncio.run(outcomes(v1_ids))
        assert loop.new_samples == 10  # stored all the same
        assert loop.live_accuracy() is None  # v2 has no outcome of its own yet
        asyncio.run(outcomes(v2_ids))
        assert loop.live_accuracy() == 0.0
    finally:
        loop.close()
