"""`xylen-server model backup|restore|rollback|list` and `replay`: round trips with checksum
verification, a tampered archive refused, a running server picking the result up through its
hot swap, and a past prediction recomputed bit-exactly by the version that made it."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import InProcessServer, feature_input, synthetic_candles, write_model
from learning_helpers import add_version, learning_settings

from training.metadata import ModelMetadata, sha256_file
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.__main__ import main
from xylen_server.learning.replay import replay_command


@pytest.fixture
def root(tmp_path: Path, candles, monkeypatch: pytest.MonkeyPatch) -> Path:
    models = tmp_path / "models"
    write_model(models, "model_1", "lightgbm", candles, trees=30)
    add_version(models, 2, seed=2)
    add_version(models, 3, seed=3)
    monkeypatch.setenv("MODEL_PATH", str(models))
    monkeypatch.setenv("MODEL_NAME", "model_1")
    monkeypatch.setenv("FEEDBACK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PARITY_PROBE_ROWS", "256")
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    return tmp_path


@pytest.fixture
def live(root: Path) -> Iterator[tuple[InProcessServer, pb_grpc.ModelServiceStub]]:
    server = InProcessServer(learning_settings(root))
    with grpc.insecure_channel(server.address) as channel:
        yield server, pb_grpc.ModelServiceStub(channel)
    server.close()


def _serving(stub: pb_grpc.ModelServiceStub) -> int:
    return stub.GetModelInfo(pb.GetModelInfoRequest()).model_info.version


def _tampered(source: Path, target: Path, victim: str) -> Path:
    """A copy of the archive with one byte of ``victim`` changed and the manifest kept."""
    with tarfile.open(source, "r:gz") as tar, tarfile.open(target, "w:gz") as out:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith("/" + victim):
                data = data[:-2] + bytes([data[-2] ^ 1]) + data[-1:]
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    return target


def test_backup_restore_rollback_round_trip_through_a_running_server(live, root, capsys):
    server, stub = live
    address = server.address
    models = root / "models"

    assert main(["model", "rollback", "--to", "2", "--address", address]) == 0
    assert _serving(stub) == 2
    archive = root / "backups" / "model_1-v2.tar.gz"
    assert main(["model", "backup", "--out", str(archive)]) == 0
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("MANIFEST.json"))  # type: ignore[arg-type]
        names = sorted(m.name for m in tar.getmembers())
    assert manifest["version"] == 2
    assert "model_1-v2/lightgbm_model.txt" in names and "model_1-v2/metadata.json" in names
    for name, digest in manifest["files"].items():
        assert sha256_file(models / ".versions" / "model_1" / "2" / name) == digest

    # Roll forward to v3 with the CLI offline, then the server picks it up with a reload.
    assert main(["model", "rollback", "--to", "3"]) == 0
    assert ModelMetadata.read(models / "model_1").version == 3
    assert _serving(stub) == 2
    reloaded = stub.ReloadModel(pb.ReloadModelRequest())
    assert reloaded.changed and _serving(stub) == 3

    # Lose v2 from the history entirely; restore brings it back, verified, and hot-swaps.
    import shutil

    shutil.rmtree(models / ".versions" / "model_1" / "2")
    assert main(["model", "restore", str(archive), "--address", address]) == 0
    assert _serving(stub) == 2
    kept = models / ".versions" / "model_1" / "2"
    assert sha256_file(kept / "lightgbm_model.txt") == manifest["files"]["lightgbm_model.txt"]
    assert main(["model", "list"]) == 0
    listing = capsys.readouterr().out
    assert "* model_1 v2" in listing and "  model_1 v3" in listing


@pytest.mark.parametrize("victim", ["lightgbm_model.txt", "metadata.json"])
def test_a_tampered_archive_is_refused_and_nothing_changes(root, victim, capsys):
    models = root / "models"
    archive = root / "v1.tar.gz"
    assert main(["model", "backup", "--out", str(archive)]) == 0
    assert main(["model", "rollback", "--to", "3"]) == 0
    before = {p.name: sha256_file(p) for p in (models / "model_1").iterdir()}
    bad = _tampered(archive, root / "bad.tar.gz", victim)
    capsys.readouterr()

    assert main(["model", "restore", str(bad)]) == 1
    assert "sha256" in capsys.readouterr().err
    assert {p.name: sha256_file(p) for p in (models / "model_1").iterdir()} == before
    truncated = root / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:-200])
    assert main(["model", "restore", str(truncated)]) == 1
    assert {p.name: sha256_file(p) for p in (models / "model_1").iterdir()} == before
    # The good archive still restores.
    assert main(["model", "restore", str(archive)]) == 0
    assert ModelMetadata.read(models / "model_1").version == 1


def test_replay_recomputes_a_past_prediction_bit_exactly_with_its_version(
    root, feature_rows, capsys
):
    server = InProcessServer(learning_settings(root))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            by_v1 = stub.Predict(
                pb.PredictRequest(inputs=[feature_input(r) for r in feature_rows[:40]])
            ).predictions[17]
            stub.RollbackModel(pb.RollbackModelRequest(version=3))
            by_v3 = stub.Predict(pb.PredictRequest(inputs=[feature_input(feature_rows[17])]))
            by_v3_id = by_v3.predictions[0].prediction_id
    finally:
        server.close()  # flushes the prediction log
    capsys.readouterr()
    log_dir = learning_settings(root).prediction_log_path
    in_flight = log_dir / "part-1800000000000-00000099.parquet.tmp"  # a live server's flush
    in_flight.write_bytes(b"being written")
    assert main(["replay", by_v1.prediction_id]) == 0
    out = capsys.readouterr().out
    assert "v1" in out and repr(by_v1.probability_up) in out and "bit-exact: yes" in out
    assert in_flight.read_bytes() == b"being written"  # replay reads: it deletes nothing
    in_flight.unlink()
    assert main(["replay", by_v3_id]) == 0
    out = capsys.readouterr().out
    assert "v3" in out and "bit-exact: yes" in out
    assert main(["replay", "no-such-id"]) == 1
    # With WORKERS=N a worker i > 0 keeps its parts under worker-<i>/: replay finds them there.
    worker_dir = log_dir / "worker-1"
    worker_dir.mkdir()
    parts = [p for p in log_dir.iterdir() if p.is_file()]
    assert parts
    for part in parts:
        part.rename(worker_dir / part.name)
    capsys.readouterr()
    assert main(["replay", by_v1.prediction_id]) == 0
    assert "bit-exact: yes" in capsys.readouterr().out


def test_replay_of_a_calibrated_models_prediction_is_bit_exact(tmp_path, capsys):
    # Every `make train` model carries a calibration; the logged P(up) is the calibrated one.
    # Replay compared the engine's raw P(up) with it: "bit-exact: NO", exit 1, every time.
    candles = synthetic_candles()
    model_dir = write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=20)
    meta = json.loads((model_dir / "metadata.json").read_text())
    meta["calibration"] = {"method": "platt", "a": 1.7, "b": -0.2}
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    width = len(meta["feature_names"])
    settings = learning_settings(tmp_path)
    server = InProcessServer(settings)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            rows = [[0.1 * i + 0.01 * j for i in range(width)] for j in range(4)]
            alone = stub.Predict(pb.PredictRequest(inputs=[feature_input(rows[0])]))
            batch = stub.Predict(pb.PredictRequest(inputs=[feature_input(r) for r in rows[1:]]))
    finally:
        server.close()  # flushes the prediction log
    for prediction in [*alone.predictions, *batch.predictions]:
        capsys.readouterr()
        assert replay_command(settings, prediction.prediction_id, None) == 0
        out = capsys.readouterr().out
        assert repr(prediction.probability_up) in out and "calibrated" in out
        assert "bit-exact: yes" in out
