"""Feedback over real gRPC: joined to what was predicted, durable, idempotent, refusals with
reasons, and every acknowledged record surviving kill -9 of a real server process."""

from __future__ import annotations

import itertools
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
from learning_helpers import feedback, fill_disk, learning_settings, tmpfs

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


def test_feedback_with_the_very_features_predict_got_is_joined_with_a_tiny_value(
    live, feature_rows
):
    # The model sees 1e-36 as 0.0 (model_input's zero snap) and the log holds what it saw; the
    # caller sends back what it sent. That was refused FEATURES_MISMATCH, alone and in a batch.
    _, stub = live
    for batch in (1, 3):
        rows = feature_rows[20 : 20 + batch].astype(np.float64)
        rows[:, 4] = 1e-36
        response = stub.Predict(pb.PredictRequest(inputs=[feature_input(r) for r in rows]))
        for prediction, row in zip(response.predictions, rows, strict=True):
            answer = stub.Feedback(feedback(prediction.prediction_id, 0.01, row))
            assert not answer.duplicate
        changed = rows[0].copy()
        changed[5] += 0.5  # a real difference is still refused
        with pytest.raises(grpc.RpcError) as caught:
            stub.Feedback(feedback(response.predictions[0].prediction_id, 0.02, changed))
        assert error_info(caught.value).reason == "FEATURES_MISMATCH"


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


def test_feedback_comes_back_by_itself_after_a_full_disk_is_freed(
    tmp_path: Path, candles, feature_rows
):
    """A real server whose data directory is on a small tmpfs: filled up, Feedback answers
    UNAVAILABLE and Predict keeps serving; freed, Feedback stores again without a restart."""
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=10)
    with tmpfs(tmp_path / "data", "3m"):
        server = InProcessServer(learning_settings(tmp_path))
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.ModelServiceStub(channel)
                assert not stub.Feedback(feedback("before", 0.01, feature_rows[0])).duplicate
                filler = fill_disk(tmp_path / "data")
                for i in range(3):
                    with pytest.raises(grpc.RpcError) as full:
                        stub.Feedback(feedback(f"full-{i}", 0.01, feature_rows[1]))
                    assert full.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert error_info(full.value).reason == "FEEDBACK_STORE_FAILED"
                assert stub.Predict(pb.PredictRequest(inputs=[feature_input(feature_rows[2])]))
                filler.unlink()
                assert not stub.Feedback(feedback("after", 0.01, feature_rows[3])).duplicate
                assert stub.Feedback(feedback("full-0", 0.01, feature_rows[1])).stored_samples == 3
            ids = server.running.feedback.require_store().read_samples()["prediction_id"]
            assert sorted(ids) == ["after", "before", "full-0"]
        finally:
            server.close()


def test_a_store_held_by_another_process_is_opened_once_it_is_free(tmp_path, candles, feature_rows):
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=10)
    settings = learning_settings(tmp_path)
    other = FeedbackStore(settings.learning_dir)  # as another server of this model would
    server = InProcessServer(settings)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            with pytest.raises(grpc.RpcError) as held:
                stub.Feedback(feedback("first", 0.01, feature_rows[0]))
            assert held.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(held.value).reason == "FEEDBACK_STORE_UNAVAILABLE"
            other.close()
            assert not stub.Feedback(feedback("first", 0.01, feature_rows[0])).duplicate
    finally:
        other.close()
        server.close()


#: Refused requests the kill -9 test mixes in, each made from a unique id; none may be stored.
MALFORMED = {
    "id_129_bytes": lambda pid, row: feedback(pid.ljust(129, "x"), 0.01, row),
    "id_1_mib": lambda pid, row: feedback(pid.ljust(1 << 20, "x"), 0.01, row),
    "nan_pnl": lambda pid, row: _with(feedback(pid, 0.01, row), pnl=float("nan")),
    "inf_return": lambda pid, row: feedback(pid, float("inf"), row),
    "feature_1e300": lambda pid, row: feedback(pid, 0.01, [1e300, *row[1:]]),
    "short_row": lambda pid, row: feedback(pid, 0.01, row[:-1]),
    "year_10000": lambda pid, row: _with(feedback(pid, 0.01, row), seconds=253_402_300_800),
    "seconds_2_62": lambda pid, row: _with(feedback(pid, 0.01, row), seconds=2**62),
    "bad_nanos": lambda pid, row: _with(feedback(pid, 0.01, row), nanos=-1),
    "before_2000": lambda pid, row: _with(feedback(pid, 0.01, row), seconds=0),
}


def _with(request: pb.FeedbackRequest, **fields: float) -> pb.FeedbackRequest:
    for name, value in fields.items():
        target = request.outcome if name == "pnl" else request.outcome.close_time
        setattr(target, name, value)
    return request


def test_kill_9_mid_stream_with_bad_records_in_the_mix_loses_nothing_acknowledged(
    tmp_path: Path, candles, feature_rows
):
    """Six callers send new outcomes, repeats of acknowledged ones, and every kind of refused
    record (oversized ids, non-finite values, out-of-range times...) to a real server process,
    which is killed with SIGKILL mid-stream. After a restart every acknowledged record is there
    exactly once and nothing refused was stored."""
    models = tmp_path / "models"
    write_model(models, "model_1", "lightgbm", candles, trees=20)
    env = {"FEEDBACK_DATA_DIR": str(tmp_path / "data"), "RETRAIN_AUTO": "false"}
    server = start_server(models, env=env, log_dir=tmp_path)
    acknowledged: set[str] = set()
    repeats: list[str] = []
    refused: dict[str, str] = {}  # id (first 64 characters) -> reason
    improper: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    kinds = ["new", "new", "repeat", *MALFORMED]

    def client(k: int) -> None:
        last = ""
        with server.channel() as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            for i in itertools.count():
                if stop.is_set():
                    return
                kind, pid, row = kinds[(i + k) % len(kinds)], f"c{k}-{i}", feature_rows[i % 1000]
                if kind == "repeat" and last:
                    request = feedback(last, 0.01, feature_rows[0])
                elif kind in MALFORMED:
                    request = MALFORMED[kind](pid, [float(v) for v in row])
                else:
                    request = feedback(pid, 0.01 * (i % 3 - 1), row)
                try:
                    answer = stub.Feedback(request, timeout=10)
                except grpc.RpcError as error:
                    code = error.code()  # type: ignore[attr-defined]
                    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                        with lock:
                            refused[request.prediction_id[:64]] = error_info(error).reason
                        continue
                    if code != grpc.StatusCode.UNAVAILABLE:
                        improper.append(f"{kind}: {code}")
                    return  # the server is gone; this one was not acknowledged
                with lock:
                    if answer.duplicate:
                        repeats.append(answer.prediction_id)
                    else:
                        acknowledged.add(answer.prediction_id)
                        last = answer.prediction_id

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
    assert len(acknowledged) >= 600 and not improper
    assert repeats and set(repeats) <= acknowledged
    assert set(refused.values()) >= {"PREDICTION_ID_TOO_LONG", "INVALID_OUTCOME",
                                     "OUTCOME_IN_FUTURE", "FEATURE_OUT_OF_RANGE",
                                     "FEATURE_COUNT_MISMATCH"}  # fmt: skip

    restarted = start_server(models, env=env, log_dir=tmp_path)
    with restarted.channel() as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        some = sorted(acknowledged)[0]
        assert stub.Feedback(feedback(some, 0.01, feature_rows[0])).duplicate
    assert restarted.stop() == 0

    with FeedbackStore(tmp_path / "data" / "model_1") as store:
        ids = store.read_samples().get_column("prediction_id").to_list()
    lost = acknowledged - set(ids)
    print(
        f"\nkill -9 mid-stream: {len(acknowledged)} acknowledged, {len(repeats)} repeats "
        f"answered duplicate, {len(refused)} refused, {len(lost)} lost, "
        f"{len(set(ids)) - len(acknowledged)} stored but unanswered when killed"
    )
    assert len(ids) == len(set(ids)), "a record was stored twice"
    assert not lost, f"{len(lost)} acknowledged records lost"
    assert not set(refused) & {pid[:64] for pid in ids}, "a refused record was stored"
    assert max(len(pid.encode()) for pid in ids) <= 128
