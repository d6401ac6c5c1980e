"""Incremental retraining of XGBoost and CatBoost models through the gate: the serving model's
trees are continued (XGBoost ``xgb_model``, CatBoost ``init_model``, through the training
code's own model classes), scored against it on held-out outcomes, promoted and served."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import InProcessServer, feature_input, write_model
from learning_helpers import learnable_labels, learning_settings, send_samples, wait_job

from training.metadata import ModelMetadata
from training.trainers import MODEL_CLASSES, make_model
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.auth import with_token

ADMIN_TOKEN = "continued-test-admin-token"


@pytest.mark.parametrize("model_type", ["xgboost", "catboost"])
def test_continued_training_through_the_gate(tmp_path: Path, candles, feature_rows, model_type):
    write_model(tmp_path / "models", "model_1", model_type, candles, trees=30)
    # Outcomes from an authenticated caller: the gate scores only on those.
    server = InProcessServer(learning_settings(tmp_path, admin_token=ADMIN_TOKEN))
    try:
        with with_token(grpc.insecure_channel(server.address), ADMIN_TOKEN) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            rows = feature_rows[:800]
            send_samples(stub, rows, learnable_labels(rows), model_type)
            job = stub.Retrain(pb.RetrainRequest(mode=pb.RETRAIN_MODE_INCREMENTAL)).job_id
            final = wait_job(stub, job)
            assert final.state == pb.TRAINING_STATE_SUCCEEDED, final.message
            assert final.gate.passed and final.candidate_version == 2
            assert final.gate.candidate_log_loss < final.gate.serving_log_loss
            probe = pb.PredictRequest(inputs=[feature_input(feature_rows[950])])
            assert stub.Predict(probe).predictions[0].model_version == 2
    finally:
        server.close()
    parent_dir = server.settings.history_dir / "1"
    child_dir = server.settings.history_dir / "2"
    meta = ModelMetadata.read(child_dir)
    assert meta.metrics["retrain_mode"] == "incremental"  # continued, not the full fallback
    names = list(meta.feature_names)
    parent = MODEL_CLASSES[model_type].load(parent_dir, names)
    child = MODEL_CLASSES[model_type].load(child_dir, names)
    assert parent.best_iteration == 30
    assert child.best_iteration is not None and child.best_iteration > 30
    print(
        f"{model_type} incremental: trees 30 -> {child.best_iteration}; held-out log loss "
        f"{final.gate.serving_log_loss:.4f} -> {final.gate.candidate_log_loss:.4f}, AUC "
        f"{final.gate.serving_auc:.4f} -> {final.gate.candidate_auc:.4f} "
        f"on {final.gate.holdout_samples} rows"
    )


@pytest.mark.parametrize("model_type", ["lightgbm", "xgboost", "catboost"])
def test_finetune_adds_trees_that_learn_the_new_labels(feature_rows, model_type):
    """Continued training keeps the model's trees and adds new ones fitted on the new rows:
    the tree count grows by the rounds asked for, and opposite labels move P(up) their way."""
    x = feature_rows[:600]
    y = learnable_labels(x)
    names = [f"f{i}" for i in range(x.shape[1])]
    model = make_model(model_type, {"n_estimators": 20}, feature_names=names, num_threads=1)
    model.fit(x[:400], y[:400], x[400:500], y[400:500])
    before = model.best_iteration
    assert before is not None
    old = model.predict_proba(x[500:])
    model.finetune(x[:500], 1 - y[:500], rounds=15)  # the opposite labels: must move P(up)
    assert model.best_iteration == before + 15
    new = model.predict_proba(x[500:])
    assert np.mean(new[y[500:] == 1]) < np.mean(old[y[500:] == 1])
