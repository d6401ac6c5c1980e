"""Retrain over real gRPC: the gate refuses a candidate trained on shuffled labels and promotes
one trained on good data (a real subprocess each time), one job at a time, clear failures, and
the automatic triggers by sample count and by degraded live accuracy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from errorinfo import error_info
from harness import InProcessServer, feature_input, write_model
from learning_helpers import (
    feedback,
    learnable_labels,
    learning_settings,
    send_samples,
    wait_for,
    wait_job,
)

from training.metadata import ModelMetadata
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.auth import with_token

ADMIN_TOKEN = "retrain-test-admin-token"


@pytest.fixture
def make_server(tmp_path: Path, candles) -> Iterator:
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=30)
    servers: list[InProcessServer] = []
    channels: list[grpc.Channel] = []

    def make(**overrides: object) -> tuple[InProcessServer, pb_grpc.ModelServiceStub]:
        # Outcomes from an authenticated caller: the gate scores only on those.
        overrides.setdefault("admin_token", ADMIN_TOKEN)
        server = InProcessServer(learning_settings(tmp_path, **overrides))
        channel = with_token(grpc.insecure_channel(server.address), ADMIN_TOKEN)
        servers.append(server)
        channels.append(channel)
        return server, pb_grpc.ModelServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()
    for server in servers:
        server.close()


def _info(stub: pb_grpc.ModelServiceStub) -> pb.ModelInfo:
    return stub.GetModelInfo(pb.GetModelInfoRequest()).model_info


def test_shuffled_labels_are_refused_and_the_old_model_keeps_serving(make_server, feature_rows):
    server, stub = make_server()
    rows = feature_rows[:1000]
    labels = np.random.default_rng(5).permutation(learnable_labels(rows))
    send_samples(stub, rows, labels, "shuffled")
    probe = pb.PredictRequest(inputs=[feature_input(r) for r in feature_rows[900:905]])
    before = stub.Predict(probe)

    started = stub.Retrain(pb.RetrainRequest(mode=pb.RETRAIN_MODE_FULL))
    assert started.status.state == pb.TRAINING_STATE_RUNNING and started.job_id
    final = wait_job(stub, started.job_id)

    assert final.state == pb.TRAINING_STATE_REJECTED, final.message
    gate = final.gate
    assert not gate.passed and gate.holdout_samples == 200
    assert gate.candidate_auc < gate.min_auc or (
        gate.candidate_log_loss > gate.serving_log_loss + gate.margin
    )
    assert np.isfinite([gate.serving_log_loss, gate.candidate_log_loss]).all()
    info = _info(stub)
    assert info.version == 1 and info.training_status.state == pb.TRAINING_STATE_REJECTED
    after = stub.Predict(probe)
    assert [p.probability_up for p in after.predictions] == [
        p.probability_up for p in before.predictions
    ]
    assert {p.model_version for p in after.predictions} == {1}
    status = json.loads(
        (server.settings.learning_dir / "jobs" / started.job_id / "status.json").read_text()
    )
    assert status["state"] == "TRAINING_STATE_REJECTED"


@pytest.mark.parametrize("mode", [pb.RETRAIN_MODE_INCREMENTAL, pb.RETRAIN_MODE_FULL])
def test_good_data_is_promoted_with_both_scores_recorded(make_server, feature_rows, mode):
    server, stub = make_server()
    rows = feature_rows[:800]
    send_samples(stub, rows, learnable_labels(rows), "good")

    job = stub.Retrain(pb.RetrainRequest(mode=mode)).job_id
    final = wait_job(stub, job)

    assert final.state == pb.TRAINING_STATE_SUCCEEDED, final.message
    assert final.gate.passed and final.candidate_version == 2
    assert final.gate.candidate_log_loss < final.gate.serving_log_loss
    info = _info(stub)
    assert (info.version, info.parent_version) == (2, 1)
    assert info.training_status.job_id == job
    probe = pb.PredictRequest(inputs=[feature_input(feature_rows[950])])
    assert stub.Predict(probe).predictions[0].model_version == 2
    # The decision and both scores travel in the new model's metadata, kept and serving.
    for directory in (server.settings.model_dir, server.settings.history_dir / "2"):
        meta = ModelMetadata.read(directory)
        assert meta.version == 2 and meta.parent_version == 1
        assert meta.metrics["gate"]["passed"] is True
        assert meta.metrics["gate"]["candidate_auc"] == pytest.approx(final.gate.candidate_auc)
        assert meta.data["feedback"]["new_samples"] == 800
    # Everything it was trained on is now old: a retrain right away has no new samples.
    with pytest.raises(grpc.RpcError) as caught:
        stub.Retrain(pb.RetrainRequest())
    assert error_info(caught.value).reason == "NOT_ENOUGH_SAMPLES"


def test_one_job_at_a_time_and_a_dry_run_never_promotes(make_server, feature_rows):
    _, stub = make_server()
    rows = feature_rows[:400]
    send_samples(stub, rows, learnable_labels(rows), "dry")
    first = stub.Retrain(pb.RetrainRequest(dry_run=True)).job_id
    with pytest.raises(grpc.RpcError) as caught:
        stub.Retrain(pb.RetrainRequest())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info.reason == "RETRAIN_RUNNING" and info.metadata["job_id"] == first
    with pytest.raises(grpc.RpcError) as caught:
        stub.RollbackModel(pb.RollbackModelRequest(version=1))
    assert error_info(caught.value).reason == "RETRAIN_RUNNING"
    final = wait_job(stub, first)
    assert final.state == pb.TRAINING_STATE_SUCCEEDED and final.dry_run
    assert "dry run" in final.message
    assert _info(stub).version == 1


def test_too_few_samples_and_a_single_class_fail_clearly(make_server, feature_rows):
    _, stub = make_server()
    send_samples(stub, feature_rows[:60], np.ones(60, np.int64), "few")
    # A bad argument is named before any precondition; an unknown mode used to start a job
    # in the configured mode.
    for bad, reason in (
        (pb.RetrainRequest(mode=99), "INVALID_RETRAIN_MODE"),  # type: ignore[arg-type]
        (pb.RetrainRequest(mode=-3), "INVALID_RETRAIN_MODE"),  # type: ignore[arg-type]
        (pb.RetrainRequest(min_samples=-1), "INVALID_MIN_SAMPLES"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Retrain(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert error_info(caught.value).reason == reason
    assert _info(stub).training_status.state == pb.TRAINING_STATE_IDLE
    with pytest.raises(grpc.RpcError) as caught:
        stub.Retrain(pb.RetrainRequest())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "NOT_ENOUGH_SAMPLES"
    with pytest.raises(grpc.RpcError) as caught:
        stub.Retrain(pb.RetrainRequest(min_samples=5000))
    assert error_info(caught.value).metadata["required"] == "5000"

    send_samples(stub, feature_rows[60:200], np.ones(140, np.int64), "one-class")
    final = wait_job(stub, stub.Retrain(pb.RetrainRequest()).job_id)
    assert final.state == pb.TRAINING_STATE_FAILED
    assert "single class" in final.message and "untouched" in final.message
    assert _info(stub).version == 1


def test_enough_new_samples_trigger_a_retrain(make_server, feature_rows):
    _, stub = make_server(retrain_auto=True, retrain_trigger_new_samples=300)
    rows = feature_rows[:299]
    send_samples(stub, rows, learnable_labels(rows), "auto")
    assert _info(stub).training_status.state == pb.TRAINING_STATE_IDLE
    stub.Feedback(feedback("auto-last", 0.01, feature_rows[299]))
    status = _info(stub).training_status
    assert status.state == pb.TRAINING_STATE_RUNNING and status.trigger == "new_samples"
    final = wait_job(stub, status.job_id)
    assert final.state == pb.TRAINING_STATE_SUCCEEDED, final.message
    assert _info(stub).version == 2


def test_degraded_live_accuracy_triggers_a_retrain(make_server, feature_rows):
    _, stub = make_server(
        retrain_auto=True,
        retrain_trigger_new_samples=0,
        retrain_trigger_accuracy=0.45,
        retrain_accuracy_window=100,
    )
    rows = feature_rows[:150]
    predictions = stub.Predict(pb.PredictRequest(inputs=[feature_input(r) for r in rows]))
    # Half right, then wrong on every call: accuracy over the last 100 drifts below 0.45.
    for i, prediction in enumerate(predictions.predictions):
        up = prediction.probability_up >= 0.5
        right = i < 50 and i % 2 == 0
        went_up = up if right else not up
        stub.Feedback(feedback(prediction.prediction_id, 0.01 if went_up else -0.01))
        status = _info(stub).training_status
        if status.state != pb.TRAINING_STATE_IDLE:
            break
    assert status.trigger == "accuracy"
    # 100 outcomes of which at most 45 right at the moment it fired.
    assert i >= 99
    wait_for(lambda: _info(stub).training_status.state != pb.TRAINING_STATE_RUNNING)
