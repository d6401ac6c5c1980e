"""A retrain's candidate is promoted only over the model it was gated against: when a reload
replaces the serving model during the job (an operator's offline rollback, a restore), the
job ends REJECTED and the model the operator chose keeps serving. Before, the candidate,
compared with v1 only, replaced the v2 the operator had put back."""

from __future__ import annotations

import grpc
from harness import InProcessServer, synthetic_candles, training_rows, write_model
from learning_helpers import (
    add_version,
    learnable_labels,
    learning_settings,
    send_samples,
    wait_job,
)

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.auth import with_token
from xylen_server.versions.history import rollback_files

TOKEN = "parent-test-admin-token"


def test_a_reload_during_the_job_keeps_the_reloaded_model(tmp_path) -> None:
    candles = synthetic_candles()
    rows = training_rows(candles)[0][:800]
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=30)  # v1 serving
    add_version(tmp_path / "models", 2, seed=2)  # v2 kept
    server = InProcessServer(learning_settings(tmp_path, admin_token=TOKEN))
    channel = with_token(grpc.insecure_channel(server.address), TOKEN)
    stub = pb_grpc.ModelServiceStub(channel)
    try:
        send_samples(stub, rows, learnable_labels(rows), "good")
        job = stub.Retrain(pb.RetrainRequest(mode=pb.RETRAIN_MODE_INCREMENTAL)).job_id
        # The job is running when the operator
        # rolls back offline and reloads.
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).model_info.training_status.state == (
            pb.TRAINING_STATE_RUNNING
        )
        rollback_files(tmp_path / "models", "model_1", 2)
        reloaded = stub.ReloadModel(pb.ReloadModelRequest())
        assert reloaded.changed and reloaded.model_info.version == 2
        final = wait_job(stub, job)
        info = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info
    finally:
        channel.close()
        server.close()
    assert final.state == pb.TRAINING_STATE_REJECTED, final.message
    assert final.serving_version == 1
    assert "v2 replaced v1" in final.message and "v2 keeps serving" in final.message
    assert info.version == 2
