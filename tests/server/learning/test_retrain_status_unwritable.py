"""A retrain job whose status file cannot be written (a full disk, here a directory in its
place) still ends for the automatic triggers: the outcomes it was started on do not start
another job with the next outcome. Real server, real training subprocess."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
from harness import InProcessServer, write_model
from learning_helpers import feedback, learning_settings, send_samples, wait_job

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.auth import with_token

ADMIN_TOKEN = "retrain-status-test-token"


def test_a_job_whose_status_cannot_be_written_still_resets_the_triggers(
    tmp_path: Path, candles, feature_rows
) -> None:
    """job_ended() sat inside the suppress(OSError) of the status write: with the write
    failing, the sample count the trigger reads was never reset, so the next outcome started
    another job (and every one after it, each failing the same way). Fails before, passes
    after."""
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=10)
    settings = learning_settings(
        tmp_path, admin_token=ADMIN_TOKEN, retrain_auto=True, retrain_trigger_new_samples=150
    )
    server = InProcessServer(settings)
    channel = with_token(grpc.insecure_channel(server.address), ADMIN_TOKEN)
    try:
        stub = pb_grpc.ModelServiceStub(channel)
        send_samples(stub, feature_rows[:140], np.ones(140, np.int64), "one-class")
        job_id = stub.Retrain(pb.RetrainRequest()).job_id  # fails: a single class
        (settings.learning_dir / "jobs" / job_id / "status.json").mkdir(parents=True)
        final = wait_job(stub, job_id)
        assert final.state == pb.TRAINING_STATE_FAILED and "single class" in final.message
        for i in range(10):  # 150 outcomes since the last job started, had it not ended
            stub.Feedback(feedback(f"after-{i}", 0.01, feature_rows[200 + i]))
        status = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info.training_status
        assert status.job_id == job_id, status.trigger
        assert server.running.feedback.arrived == 10
    finally:
        channel.close()
        server.close()
