"""A full retrain learns from the model's own history wherever it is started from, and refuses
(naming the path) when that history is missing, rather than quietly training on less."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
from errorinfo import error_info
from harness import InProcessServer, write_model
from learning_helpers import learnable_labels, learning_settings, send_samples, wait_job

from training.generator import generate
from training.metadata import ModelMetadata, history_files, sha256_file
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.auth import with_token
from xylen_server.learning.job import JobFailed
from xylen_server.learning.job.run import history_rows

ADMIN_TOKEN = "history-test-admin-token"


@pytest.fixture
def root(tmp_path: Path, candles) -> Path:
    """``<root>/data/*.zip`` and ``<root>/models/model_1`` whose metadata names the files
    relative to ``<root>``, as a training run started in ``<root>`` used to write them."""
    zips = generate(tmp_path / "data", start="2023-01", end="2023-02", seed=3)
    model_dir = write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=30)
    meta = ModelMetadata.read(model_dir)
    files = [
        {"path": str(z.relative_to(tmp_path)), "sha256": sha256_file(z), "rows": 0} for z in zips
    ]
    dataclasses.replace(meta, interval="1h", data={"files": files}).write(model_dir)
    return tmp_path


@pytest.fixture
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Run the test (and the job subprocess it starts) from an unrelated directory."""
    before = Path.cwd()
    other = tmp_path_factory.mktemp("elsewhere")
    os.chdir(other)
    try:
        yield other
    finally:
        os.chdir(before)


def _full_retrain(root: Path, feature_rows) -> tuple[pb_grpc.ModelServiceStub, InProcessServer]:
    server = InProcessServer(learning_settings(root, admin_token=ADMIN_TOKEN))
    channel = with_token(grpc.insecure_channel(server.address), ADMIN_TOKEN)
    stub = pb_grpc.ModelServiceStub(channel)
    rows = feature_rows[:400]
    send_samples(stub, rows, learnable_labels(rows), "hist")
    return stub, server


def test_relative_history_is_found_from_another_directory(root, elsewhere, feature_rows):
    stub, server = _full_retrain(root, feature_rows)
    try:
        job = stub.Retrain(pb.RetrainRequest(mode=pb.RETRAIN_MODE_FULL, dry_run=True)).job_id
        final = wait_job(stub, job)
        assert final.state in (pb.TRAINING_STATE_SUCCEEDED, pb.TRAINING_STATE_REJECTED), (
            final.message
        )
        result = json.loads(
            (server.settings.learning_dir / "jobs" / job / "result.json").read_text()
        )
    finally:
        server.close()
    # 2 months of hourly history (~1.3k usable rows) plus the feedback before the window
    assert result["mode"] == "full" and result["training_rows"] > 1000
    assert not (elsewhere / "data").exists()


def test_missing_history_fails_with_the_path_named(root, elsewhere, feature_rows):
    gone = root / "data" / "BTCUSDT-1h-2023-02.zip"
    gone.unlink()
    stub, server = _full_retrain(root, feature_rows)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Retrain(pb.RetrainRequest(mode=pb.RETRAIN_MODE_FULL))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(caught.value).reason == "TRAINING_HISTORY_MISSING"
        assert "data/BTCUSDT-1h-2023-02.zip (relative; not found from" in caught.value.details()
        info = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info
        assert info.version == 1
    finally:
        server.close()
    # The job checks again itself (a file can vanish after the start): the same path named.
    meta = ModelMetadata.read(root / "models" / "model_1")
    with pytest.raises(
        JobFailed, match=re.escape("history file missing: data/BTCUSDT-1h-2023-02.zip")
    ):
        history_rows(meta, root / "models" / ".versions" / "model_1" / "1")
    # An absolute path (what training writes now) is named as it is.
    absolute = dataclasses.replace(
        meta, data={"files": [{"path": str(gone)}, {"path": str(gone.with_name("x.zip"))}]}
    )
    with pytest.raises(
        JobFailed, match=re.escape(f"history file missing: {gone} and 1 more of 2;")
    ):
        history_rows(absolute, Path("/"))
    assert [f.exists for f in history_files(meta, root / "models" / "model_1")] == [True, False]


def test_a_changed_history_file_fails_the_job(root):
    meta = ModelMetadata.read(root / "models" / "model_1")
    changed = root / "data" / "BTCUSDT-1h-2023-01.zip"
    changed.write_bytes(changed.read_bytes() + b"\0")
    with pytest.raises(JobFailed, match="changed since training"):
        history_rows(meta, root / "models" / "model_1")


def test_history_rows_carry_the_close_time_of_the_bar_each_label_reads(root):
    """Full mode purges history rows by when their label's outcome closed, in a feedback
    sample's terms: the close time of the bar ``horizon`` bars on. The last labelled hour of
    February 2023 reads the close of its last bar, one millisecond before March."""
    model_dir = root / "models" / "model_1"
    meta = ModelMetadata.read(model_dir)
    x, y, closes, _ = history_rows(meta, model_dir)
    hour = 3_600_000
    assert len(closes) == len(y) == len(x) > 1000
    assert (np.diff(closes) > 0).all() and (np.diff(closes) % hour == 0).all()
    march = int(datetime(2023, 3, 1, tzinfo=UTC).timestamp() * 1000)
    assert meta.horizon == 1 and closes[-1] == march - 1
