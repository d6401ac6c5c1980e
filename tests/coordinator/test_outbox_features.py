"""An outcome reaches a server that lost the prediction it settles (a kill -9 took its
unflushed prediction log): the coordinator keeps each prediction's feature row and sends it
when the server answers NOT_FOUND. An outbox written before feature rows were kept opens and
works."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import harness
from coordinator.helpers import endpoint, write_config
from coordinator.lying_model_server import LyingModelServer

from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator import Coordinator
from xylen_coordinator.featurize import FEATURES_HASH, featurized
from xylen_coordinator.outbox import Outbox, PredictionRecord


def _wait_delivered(coordinator: Coordinator, pid: str) -> dict[str, tuple[str, int, str]]:
    deadline = time.monotonic() + 20
    while True:
        states = coordinator.delivery_states(pid)
        if states and all(s[0] != "pending" for s in states.values()):
            return states
        assert time.monotonic() < deadline, states
        time.sleep(0.05)


def test_outcome_for_a_forgotten_prediction_is_sent_with_its_features(tmp_path: Path) -> None:
    server = LyingModelServer("model_1", features_hash=FEATURES_HASH)
    try:
        config = write_config(
            tmp_path / "config.yaml",
            [endpoint("model_1", server.port, 1.0)],
            retraining={"feedback_delay_seconds": 0},
        )
        candles = harness.synthetic_candles(200, seed=5)
        window = harness.window_input(candles, 150)
        vector = harness.feature_input([0.25] * 25)
        with Coordinator(config) as coordinator:
            deadline = time.monotonic() + 10
            while not server.info_calls and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)  # the features hash is learnt
            server.forgot_predictions = True
            for inp in (window, vector):
                pid = coordinator.predict([inp]).decision.prediction_id
                time.sleep(0.5)  # the prediction log is written behind
                coordinator.feedback(pid, realized_return=0.01, close_time=datetime.now(UTC))
                states = _wait_delivered(coordinator, pid)
                assert states["model_1"][0] == "delivered", states
            window_fb, vector_fb = server.feedback
            expected = featurized(pb.PredictRequest(inputs=[window]))
            assert expected is not None
            assert list(window_fb.features.values) == list(expected.inputs[0].features.values)
            assert list(vector_fb.features.values) == [0.25] * 25
    finally:
        server.close()


def test_an_outbox_without_the_features_column_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE predictions (prediction_id TEXT PRIMARY KEY, created REAL NOT NULL, "
        "signal TEXT NOT NULL, votes TEXT NOT NULL);"
        "INSERT INTO predictions VALUES ('old', 1.0, 'BUY', '{\"m\": [\"m-1\", 0.7]}');"
    )
    db.commit()
    db.close()
    outbox = Outbox(path)
    try:
        old = outbox._executor.submit(outbox.find_prediction, "old").result()
        assert old == PredictionRecord("BUY", {"m": ("m-1", 0.7)}, 1.0)
        record = PredictionRecord("SELL", {"m": ("m-2", 0.3)}, 2.0, (1.0, 2.0), ("m",))
        outbox._executor.submit(outbox.write_predictions, [("new", 2.0, record)]).result()
        assert outbox._executor.submit(outbox.find_prediction, "new").result() == record
    finally:
        outbox._executor.submit(outbox._close).result()
        outbox._executor.shutdown()
