"""Retrain job directories are bounded: as a job starts, all but the newest
``RETRAIN_JOBS_KEEP`` directories under ``jobs/`` go (automatic retrains add one a trigger).
Real server, real training subprocesses; and :func:`prune_jobs` on real directories."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np
from harness import InProcessServer, write_model
from learning_helpers import learning_settings, send_samples, wait_job

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.auth import with_token
from xylen_server.learning.retrainer import prune_jobs

ADMIN_TOKEN = "retrain-jobs-keep-test-token"


def test_only_the_newest_job_directories_stay(tmp_path: Path, candles, feature_rows) -> None:
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=10)
    settings = learning_settings(tmp_path, admin_token=ADMIN_TOKEN, retrain_jobs_keep=2)
    server = InProcessServer(settings)
    channel = with_token(grpc.insecure_channel(server.address), ADMIN_TOKEN)
    jobs = settings.learning_dir / "jobs"
    try:
        stub = pb_grpc.ModelServiceStub(channel)
        send_samples(stub, feature_rows[:140], np.ones(140, np.int64), "one-class")
        started = []
        for _ in range(4):  # each fails fast (a single class) and leaves its directory
            job_id = stub.Retrain(pb.RetrainRequest()).job_id
            final = wait_job(stub, job_id)
            assert final.state == pb.TRAINING_STATE_FAILED and "single class" in final.message
            started.append(job_id)
            assert (jobs / job_id / "status.json").is_file()  # the job's own record is whole
        assert sorted(p.name for p in jobs.iterdir()) == sorted(started[-2:])
        assert (jobs / started[-1] / "spec.json").is_file()
    finally:
        channel.close()
        server.close()


def test_prune_jobs_keeps_the_newest_and_the_current_and_touches_nothing_else(
    tmp_path: Path,
) -> None:
    """Newest by the second in the name, then (jobs started within one second, whose random
    suffixes do not sort by time) by when their spec was written."""
    jobs = tmp_path / "jobs"
    # started in this order: two in second 01 (suffixes out of order), one in 02, two in 03
    order = [
        "job-20260101T000001-ffffff",
        "job-20260101T000001-000000",
        "job-20260101T000002-888888",
        "job-20260101T000003-cccccc",
        "job-20260101T000003-111111",
    ]
    for k, name in enumerate(order):
        (jobs / name).mkdir(parents=True)
        spec = jobs / name / "spec.json"
        spec.write_text("{}")
        os.utime(spec, ns=(1_000_000_000 * (k + 1), 1_000_000_000 * (k + 1)))
    (jobs / "notes.txt").write_text("an operator's file")
    (jobs / "keep-me").mkdir()
    assert prune_jobs(jobs, 3) == order[:2]
    assert sorted(p.name for p in jobs.iterdir()) == sorted([*order[2:], "notes.txt", "keep-me"])
    assert prune_jobs(jobs, 3) == []
    # the job starting now (no spec yet) stays, and counts as one of the kept
    (jobs / "job-20260101T000000-aaaaaa").mkdir()
    assert prune_jobs(jobs, 2, current="job-20260101T000000-aaaaaa") == order[2:4]
    assert sorted(p.name for p in jobs.iterdir() if p.name.startswith("job-")) == sorted(
        ["job-20260101T000000-aaaaaa", order[4]]
    )
    assert prune_jobs(tmp_path / "absent", 1) == []  # no directory yet: nothing to do
