"""The demo's learning cycle, end to end against a real server: predictions, outcomes, a
retrain, the gate's verdict and the swap, with background Predict calls that never fail."""

from __future__ import annotations

from pathlib import Path

from harness import InProcessServer, write_model
from learning_helpers import learning_settings

from xylen_server.devtools.learning_demo import run_cycle


def test_run_cycle_prints_a_promotion_while_requests_keep_flowing(tmp_path: Path, candles):
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=30)
    server = InProcessServer(learning_settings(tmp_path, admin_token="demo-token"))
    lines: list[str] = []
    try:
        run_cycle(server.address, samples=400, out=lines.append, token="demo-token")
    finally:
        server.close()
    text = "\n".join(lines)
    assert "model_1 v1 serving" in text
    assert "400 outcomes fed back" in text
    assert "-> PASSED" in text and "TRAINING_STATE_SUCCEEDED" in text
    assert "now serving v2 (parent v1)" in text
    assert ", 0 failed" in text
