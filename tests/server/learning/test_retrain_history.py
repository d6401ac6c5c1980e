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


def test_history_rows_are_built_with_the_anomaly_policy_the_model_was_trained_with(
    tmp_path: Path,
) -> None:
    # Six zero-volume bars (halts): `keep` trains on them, `drop` does not. A full retrain
    # rebuilt a `keep` model's history under the default (`drop`): other candles, features
    # and labels than the model was trained on.
    import polars as pl

    from training import features
    from training.generator import kline_csv, simulate
    from training.klines import interval_ms, load_klines
    from training.labels import binary_labels

    hour, t0 = 3_600_000, 1_704_067_200_000
    frame = simulate(t0 + hour * np.arange(400, dtype=np.int64), hour, 1)
    halts = [t0 + k * hour for k in (100, 150, 200, 250, 300, 350)]
    frame = frame.with_columns(
        pl.when(pl.col("open_time").is_in(halts)).then(0.0).otherwise(pl.col("volume"))
        .alias("volume")
    )  # fmt: skip
    path = tmp_path / "BTCUSDT-1h-2024-01.csv"
    path.write_bytes(kline_csv(frame))

    def trained_on(policy: str) -> tuple[np.ndarray, np.ndarray]:
        """The rows `make train` fits on under ``policy`` (training's own functions)."""
        candles = features.candles_from_frame(load_klines([path], policy=policy).frame)
        x = features.compute_features(candles)
        y = binary_labels(candles["open_time"], candles["close"], horizon=1,
                          step_ms=interval_ms("1h"))  # fmt: skip
        usable = np.isfinite(x).all(axis=1) & np.isfinite(y)
        return x[usable].astype(np.float32), y[usable].astype(np.int64)

    for policy in ("keep", "drop"):
        meta = ModelMetadata(
            name="model_1", model_type="lightgbm", version=1, training_samples=1,
            trained_at="2026-01-01T00:00:00Z", feature_names=list(features.FEATURE_NAMES),
            lookback=features.LOOKBACK_PERIODS, horizon=1, interval="1h",
            features_hash=features.feature_definitions_hash(),
            data={"files": [{"path": str(path), "sha256": sha256_file(path)}],
                  "anomaly_policy": policy},
        )  # fmt: skip
        x, y, _, _ = history_rows(meta, tmp_path)
        want_x, want_y = trained_on(policy)
        assert np.array_equal(x, want_x) and np.array_equal(y, want_y), policy
    assert len(trained_on("keep")[1]) != len(trained_on("drop")[1])  # they differ on this data
