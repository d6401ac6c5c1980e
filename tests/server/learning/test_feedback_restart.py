"""No outcome is lost over a restart: Feedback joins a prediction from the on-disk prediction log
when the server no longer holds it in memory, within PREDICTION_LOG_MAX_AGE_SECONDS."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from errorinfo import error_info
from harness import InProcessServer, feature_input, start_server, write_model
from learning_helpers import feedback, learning_settings

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.prediction_log import PredictionLog


def _predict(server: InProcessServer, rows: np.ndarray) -> pb.PredictResponse:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        return stub.Predict(pb.PredictRequest(inputs=[feature_input(r) for r in rows]))


def test_feedback_after_a_restart_joins_the_logged_prediction(
    tmp_path: Path, candles, feature_rows
):
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=20)
    settings = learning_settings(tmp_path)
    rows = feature_rows[100:140]

    first = InProcessServer(settings)
    try:
        answered = _predict(first, rows)
    finally:
        first.close()  # SIGTERM's path: the log is flushed, memory is gone
    ids = [p.prediction_id for p in answered.predictions]

    second = InProcessServer(settings)
    try:
        assert second.running.feedback.log.get(ids[0]) is None  # not in memory any more
        with grpc.insecure_channel(second.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            for i, pid in enumerate(ids):
                # no features sent: only the log knows what the model saw
                assert not stub.Feedback(feedback(pid, 0.01 if i % 2 else -0.01)).duplicate
            assert stub.Feedback(feedback(ids[3], 0.01)).duplicate
        samples = second.running.feedback.require_store().read_samples()
    finally:
        second.close()
    by_id = {row["prediction_id"]: row for row in samples.to_dicts()}
    assert len(by_id) == len(ids)
    for i, prediction in enumerate(answered.predictions):
        row = by_id[prediction.prediction_id]
        assert np.array_equal(np.asarray(row["features"], np.float32), rows[i].astype(np.float32))
        assert row["probability_up"] == prediction.probability_up
        assert row["model_version"] == 1 and row["label"] == i % 2
    print(f"restart: {len(ids)} predictions before, {len(ids)} outcomes stored after, joined")


def test_a_prediction_older_than_the_retention_is_not_joined(tmp_path: Path, candles, feature_rows):
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=20)
    settings = learning_settings(tmp_path, prediction_log_max_age_seconds=3600)
    old_ms = int(time.time() * 1000) - 2 * 3600 * 1000
    with PredictionLog(settings.prediction_log_path) as log:
        rows = feature_rows[:2].astype(np.float32)
        log.record(["old-1", "old-2"], rows, [0.4, 0.6], [2, 1], "model_1", 1, time_ms=old_ms)
    with PredictionLog(settings.prediction_log_path, max_age_seconds=3600) as log:
        assert log.find("old-1") is not None and log.find_recent("old-1") is None

    server = InProcessServer(settings)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Feedback(feedback("old-1", 0.01))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value).reason == "UNKNOWN_PREDICTION_ID"
    finally:
        server.close()


def test_a_real_server_process_stopped_with_sigterm_joins_after_its_restart(
    tmp_path: Path, candles, feature_rows
):
    """The coordinator's case: outcomes queued while a server restarts arrive at the new
    process, which finds the predictions in the log the old one flushed at SIGTERM."""
    models = tmp_path / "models"
    write_model(models, "model_1", "lightgbm", candles, trees=20)
    env = {"FEEDBACK_DATA_DIR": str(tmp_path / "data"), "RETRAIN_AUTO": "false"}
    rows = feature_rows[300:325]
    first = start_server(models, env=env, log_dir=tmp_path)
    with first.channel() as channel:
        answered = pb_grpc.ModelServiceStub(channel).Predict(
            pb.PredictRequest(inputs=[feature_input(r) for r in rows])
        )
    assert first.stop(signal.SIGTERM) == 0
    second = start_server(models, env=env, log_dir=tmp_path)
    try:
        with second.channel() as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            stored = [
                stub.Feedback(feedback(p.prediction_id, 0.01)).stored_samples
                for p in answered.predictions
            ]
    finally:
        assert second.stop(signal.SIGTERM) == 0
    assert stored == list(range(1, len(rows) + 1))
    with FeedbackStore(tmp_path / "data" / "model_1") as store:
        samples = store.read_samples()
    by_id = {row["prediction_id"]: row for row in samples.to_dicts()}
    for i, prediction in enumerate(answered.predictions):
        row = by_id[prediction.prediction_id]
        assert np.array_equal(np.asarray(row["features"], np.float32), rows[i].astype(np.float32))
        assert row["probability_up"] == prediction.probability_up


def test_find_recent_indexes_the_log_once_and_sees_new_parts(tmp_path: Path):
    """The disk lookup behind the join: ids from any part within the retention, also parts
    written after the first lookup and rows memory let go; none from too old a part."""
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    now = int(time.time() * 1000)
    writer = PredictionLog(tmp_path, max_rows=4)  # memory holds one batch of 4 at most
    for batch in range(20):
        ids = [f"b{batch}-{i}" for i in range(4)]
        old = batch == 0  # the first batch is older than the reader's retention
        when = now - (7200_000 if old else (20 - batch) * 1000)
        writer.record(ids, rows, [0.5] * 4, [3] * 4, "model_1", 1, time_ms=when)
        writer.flush()
    reader = PredictionLog(tmp_path, max_age_seconds=3600)
    try:
        found = reader.find_recent("b7-2")
        assert found is not None and np.array_equal(found.features, rows[2])
        assert reader.find_recent("b0-1") is None  # two hours old
        assert reader.find_recent("never") is None
        writer.record(["late-0"], rows[:1], [0.9], [1], "model_1", 1)
        writer.flush()
        assert reader.find_recent("late-0") is not None  # a part written after the index
        # the writer's memory let b3 go long ago; its disk still answers
        assert writer.get("b3-0") is None and writer.find_recent("b3-0") is not None
    finally:
        reader.close()
        writer.close()
