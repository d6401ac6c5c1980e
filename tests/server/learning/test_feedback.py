"""Feedback over real gRPC: joined to what was predicted, durable, idempotent, refusals with
reasons, and every acknowledged record surviving kill -9 of a real server process."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
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


@pytest.fixture(scope="module")
def learning_root(tmp_path_factory: pytest.TempPathFactory, candles) -> Path:
    root = tmp_path_factory.mktemp("feedback")
    write_model(root / "models", "model_1", "lightgbm", candles, trees=30)
    return root


@pytest.fixture(scope="module")
def live(learning_root: Path) -> Iterator[tuple[InProcessServer, pb_grpc.ModelServiceStub]]:
    server = InProcessServer(learning_settings(learning_root))
    with grpc.insecure_channel(server.address) as channel:
        yield server, pb_grpc.ModelServiceStub(channel)
    server.close()


def test_feedback_joins_the_row_the_model_saw_and_is_stored_once(live, feature_rows):
    server, stub = live
    rows = feature_rows[:3]
    response = stub.Predict(pb.PredictRequest(inputs=[feature_input(r) for r in rows]))
    ids = [p.prediction_id for p in response.predictions]
    first = stub.Feedback(feedback(ids[1], 0.02))
    again = stub.Feedback(feedback(ids[1], 0.02))
    assert (first.prediction_id, first.duplicate) == (ids[1], False)
    assert again.duplicate and again.stored_samples == first.stored_samples

    samples = server.running.feedback.require_store().read_samples()
    [row] = samples.filter(samples["prediction_id"] == ids[1]).to_dicts()
    assert row["model_version"] == 1 and row["label"] == 1
    assert np.array_equal(np.asarray(row["features"], np.float32), rows[1].astype(np.float32))
    assert row["probability_up"] == response.predictions[1].probability_up


def test_feedback_with_features_for_an_unlogged_prediction(live, feature_rows):
    _, stub = live
    answer = stub.Feedback(feedback("elsewhere-1", -0.01, feature_rows[10]))
    assert not answer.duplicate


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("unknown", grpc.StatusCode.NOT_FOUND, "UNKNOWN_PREDICTION_ID"),
        ("future", grpc.StatusCode.INVALID_ARGUMENT, "OUTCOME_IN_FUTURE"),
        ("no_close_time", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OUTCOME"),
        ("nan_return", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OUTCOME"),
        ("no_id", grpc.StatusCode.INVALID_ARGUMENT, "MISSING_PREDICTION_ID"),
        ("short_row", grpc.StatusCode.INVALID_ARGUMENT, "FEATURE_COUNT_MISMATCH"),
        ("mismatch", grpc.StatusCode.INVALID_ARGUMENT, "FEATURES_MISMATCH"),
    ],
)
def test_bad_feedback_gets_its_code_and_reason(live, feature_rows, case, code, reason):
    _, stub = live
    logged = stub.Predict(pb.PredictRequest(inputs=[feature_input(feature_rows[5])]))
    logged_id = logged.predictions[0].prediction_id
    request = {
        "unknown": lambda: feedback("never-predicted", 0.01),
        "future": lambda: feedback(logged_id, 0.01, close_time=datetime.now(UTC) + timedelta(1)),
        "no_close_time": lambda: pb.FeedbackRequest(
            prediction_id=logged_id, outcome=pb.TradeOutcome(pnl=1.0, realized_return=0.01)
        ),
        "nan_return": lambda: feedback(logged_id, float("nan")),
        "no_id": lambda: feedback("", 0.01, feature_rows[5]),
        "short_row": lambda: feedback("short-1", 0.01, feature_rows[5][:3]),
        "mismatch": lambda: feedback(logged_id, 0.01, feature_rows[6]),
    }[case]()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Feedback(request)
    assert caught.value.code() == code
    assert error_info(caught.value).reason == reason


def test_kill_9_while_feedback_streams_in_loses_no_acknowledged_record(
    tmp_path: Path, candles, feature_rows
):
    models = tmp_path / "models"
    write_model(models, "model_1", "lightgbm", candles, trees=20)
    env = {"FEEDBACK_DATA_DIR": str(tmp_path / "data"), "RETRAIN_AUTO": "false"}
    server = start_server(models, env=env, log_dir=tmp_path)
    acknowledged: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        with server.channel() as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            i = 0
            while not stop.is_set():
                pid = f"c{k}-{i}"
                try:
                    stub.Feedback(
                        feedback(pid, 0.01 * (i % 3 - 1), feature_rows[i % 1000]), timeout=5
                    )
                except grpc.RpcError:
                    return  # the server is gone; this one was not acknowledged
                with lock:
                    acknowledged.add(pid)
                i += 1

    clients = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for thread in clients:
        thread.start()
    try:
        deadline = datetime.now(UTC) + timedelta(seconds=60)
        while len(acknowledged) < 600 and datetime.now(UTC) < deadline:
            stop.wait(0.02)
        server.stop(signal.SIGKILL)
    finally:
        stop.set()
        for thread in clients:
            thread.join(10)
    assert len(acknowledged) >= 600

    restarted = start_server(models, env=env, log_dir=tmp_path)
    with restarted.channel() as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        some = sorted(acknowledged)[0]
        assert stub.Feedback(feedback(some, 0.01, feature_rows[0])).duplicate
    assert restarted.stop() == 0

    with FeedbackStore(tmp_path / "data" / "model_1") as store:
        ids = store.read_samples().get_column("prediction_id").to_list()
    assert len(ids) == len(set(ids)), "a record was stored twice"
    assert acknowledged <= set(ids), "an acknowledged record was lost"
