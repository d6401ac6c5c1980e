"""A retrain through the learning loop keeps its parent's calibration (and thresholds, which
are on the parent's calibrated scale): the promoted version serves the same Platt map."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
from harness import InProcessServer, feature_input, write_model
from learning_helpers import learnable_labels, learning_settings, send_samples, wait_job

from training.calibration import apply as calibrate
from training.metadata import ModelMetadata
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.auth import with_token

ADMIN_TOKEN = "calibration-test-admin-token"
CALIBRATION = {"method": "platt", "a": 0.8, "b": -0.2}


def test_a_promoted_retrain_serves_its_parents_calibration(tmp_path, candles, feature_rows):
    model_dir = write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=30)
    meta = ModelMetadata.read(model_dir)
    dataclasses.replace(meta, calibration=CALIBRATION).write(model_dir)
    server = InProcessServer(learning_settings(tmp_path, admin_token=ADMIN_TOKEN))
    try:
        channel = with_token(grpc.insecure_channel(server.address), ADMIN_TOKEN)
        stub = pb_grpc.ModelServiceStub(channel)
        rows = feature_rows[:600]
        send_samples(stub, rows, learnable_labels(rows), "cal")
        job = stub.Retrain(pb.RetrainRequest(mode=pb.RETRAIN_MODE_INCREMENTAL)).job_id
        final = wait_job(stub, job)
        assert final.state == pb.TRAINING_STATE_SUCCEEDED, final.message
        info = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info
        answer = stub.Predict(pb.PredictRequest(inputs=[feature_input(r) for r in rows[:50]]))
    finally:
        server.close()
    assert info.version == 2 and info.parent_version == 1
    assert (info.calibration_method, info.calibration_a, info.calibration_b) == (
        "platt",
        CALIBRATION["a"],
        CALIBRATION["b"],
    )
    raw = np.array([p.raw_probability_up for p in answer.predictions])
    assert {p.model_version for p in answer.predictions} == {2}
    assert np.array_equal(
        [p.probability_up for p in answer.predictions], calibrate(CALIBRATION, raw)
    )
