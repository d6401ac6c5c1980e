"""The gate never scores a candidate only on samples from an untrusted source.

A server whose admin RPCs are open (loopback, no credentials: what the issue's attacker used)
takes a flood of 400 fabricated outcomes with perfectly consistent labels from an
unauthenticated caller, who then asks for a Retrain: the job fails for want of trusted samples
and the serving model stays. The same flood sent with the admin token to a server that requires
it is promoted, so the refusal comes from who sent the outcomes, nothing else. Each stored
sample records its source. A job over a mix scores only on the authenticated samples."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import InProcessServer, feature_input, write_model
from learning_helpers import (
    feedback_records,
    job_spec,
    learnable_labels,
    learning_settings,
    send_samples,
    wait_job,
)

from training.metadata import ModelMetadata
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.auth import ADMIN_TOKEN_IDENTITY, ANONYMOUS, with_token
from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.job.run import run
from xylen_server.learning.samples import read_samples

ADMIN_TOKEN = "flood-test-admin-token"
FLOOD = 400


@pytest.fixture
def make_server(tmp_path: Path, candles) -> Iterator:
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=30)
    made: list[tuple[InProcessServer, grpc.Channel]] = []

    def make(token: str = "") -> tuple[InProcessServer, pb_grpc.ModelServiceStub]:
        server = InProcessServer(learning_settings(tmp_path, admin_token=token))
        channel = grpc.insecure_channel(server.address)
        made.append((server, channel))
        return server, pb_grpc.ModelServiceStub(with_token(channel, token))

    yield make
    for server, channel in made:
        channel.close()
        server.close()


def _flood(stub: pb_grpc.ModelServiceStub, feature_rows: np.ndarray) -> None:
    rows = feature_rows[:FLOOD]
    send_samples(stub, rows, learnable_labels(rows, noise=0.0), "fabricated")


def test_anonymous_flood_cannot_promote_a_model(make_server, feature_rows):
    server, stub = make_server()  # admin RPCs open: loopback, no credentials
    _flood(stub, feature_rows)
    probe = pb.PredictRequest(inputs=[feature_input(r) for r in feature_rows[900:905]])
    before = stub.Predict(probe)

    job = stub.Retrain(pb.RetrainRequest(mode=pb.RETRAIN_MODE_INCREMENTAL)).job_id
    final = wait_job(stub, job)

    assert final.state == pb.TRAINING_STATE_FAILED, final.message
    assert "no trusted samples" in final.message and f"all {FLOOD} new samples" in final.message
    assert not final.gate.passed and final.candidate_version == 0
    info = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info
    assert info.version == 1
    after = stub.Predict(probe)
    assert [p.probability_up for p in after.predictions] == [
        p.probability_up for p in before.predictions
    ]
    assert not (server.settings.model_path / ".versions" / "model_1" / "2").exists()
    sources = read_samples(server.settings.learning_dir).get_column("source").to_list()
    assert len(sources) == FLOOD and set(sources) == {ANONYMOUS}


def test_the_same_flood_from_an_authenticated_caller_is_promoted(make_server, feature_rows):
    server, stub = make_server(ADMIN_TOKEN)
    _flood(stub, feature_rows)

    job = stub.Retrain(pb.RetrainRequest(mode=pb.RETRAIN_MODE_INCREMENTAL)).job_id
    final = wait_job(stub, job)

    assert final.state == pb.TRAINING_STATE_SUCCEEDED, final.message
    assert final.gate.holdout_samples == math.ceil(FLOOD * 0.2)
    assert stub.GetModelInfo(pb.GetModelInfoRequest()).model_info.version == 2
    sources = read_samples(server.settings.learning_dir).get_column("source").to_list()
    assert set(sources) == {ADMIN_TOKEN_IDENTITY}


def test_a_job_over_a_mix_scores_only_on_authenticated_samples(tmp_path, candles, feature_rows):
    """300 honest outcomes (noise: nothing to learn) from an authenticated caller, then 400
    fabricated, perfectly learnable ones from anonymous callers, all newer: the window is the
    newest fifth of the 300, the candidate trained on the flood is refused on it."""
    models = tmp_path / "models"
    serving = write_model(models, "model_1", "lightgbm", candles, trees=30)
    honest_rows, flood_rows = feature_rows[:300], feature_rows[300:700]
    honest = np.random.default_rng(3).integers(0, 2, len(honest_rows))
    start = 1_700_000_000_000
    data = tmp_path / "data"
    with FeedbackStore(data, compact_rows=0) as store:
        for record in feedback_records(honest_rows, honest, "honest", "mtls:coordinator", start):
            store.append(record)
        flood_start = start + 400 * 3_600_000
        flood = learnable_labels(flood_rows, noise=0.0)
        for record in feedback_records(flood_rows, flood, "flood", ANONYMOUS, flood_start):
            store.append(record)
    spec = job_spec(tmp_path, serving, data, "mix", "full")
    result = run(spec)
    gate = result["gate"]
    assert gate["holdout_samples"] == 60  # ceil(300 * 0.2): none of the 400 anonymous ones
    assert not gate["passed"], gate["reason"]
    assert not (tmp_path / "candidate").exists()
    assert ModelMetadata.read(serving).version == 1
