"""The native side of the parity check is kept with the model (``parity.npz``), so a load needs
no reference child once it has been made (by training, or by the first load's child); the check
itself still runs at every load, and a reference that is not bound to the files being loaded is
made again, never trusted.

Children are counted where they are started (``model_store.native_reference``, the one function
that starts one, wrapped to count real calls) and seen on disk (the child rewrites
``parity.npz``, so its inode changes)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from harness import InProcessServer, server_settings, training_rows, write_model
from learning_helpers import learning_settings

from training import features
from training.metadata import (
    CONVERTER_VERSION,
    ONNX_FILE,
    PARITY_FILE,
    PARITY_PROBE_ROWS,
    MetadataError,
    ModelMetadata,
    sha256_file,
)
from training.onnx_export import CONVERTER_VERSION_KEY, NATIVE_SHA256_KEY
from training.trainers import make_model, write_model_dir
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.errors import ModelLoadError
from xylen_server.serving import model_store
from xylen_server.serving.model_store import LoadedModel, load_model
from xylen_server.versions.history import backup, restore, verify_archive, verify_model_dir


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The model directories a reference child was started for, in order."""
    started: list[Path] = []
    real = model_store.native_reference

    def counted(meta: ModelMetadata, model_dir: Path, *args: Any, **kwargs: Any) -> Any:
        started.append(model_dir)
        return real(meta, model_dir, *args, **kwargs)  # the real child process

    monkeypatch.setattr(model_store, "native_reference", counted)
    return started


def _load(root: Path, **overrides: object) -> LoadedModel:
    model = load_model(server_settings(root, **overrides))
    model.close()
    return model


def _inode(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _stored(model_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    with np.load(model_dir / PARITY_FILE) as data:
        return data["rows"], data["reference"], json.loads(str(data["binding"]))


def _rewrite(model_dir: Path, rows: np.ndarray, reference: np.ndarray, binding: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, rows=rows, reference=reference, binding=np.array(json.dumps(binding)))
    (model_dir / PARITY_FILE).write_bytes(buffer.getvalue())


@pytest.fixture
def hand_made(tmp_path: Path, candles) -> Path:
    """A model directory as an operator might bring one: native file and metadata, no ONNX,
    no parity reference. Returns the models root."""
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=30)
    return tmp_path / "models"


def test_a_second_load_of_the_same_files_starts_no_child(hand_made: Path, children) -> None:
    model_dir = hand_made / "model_1"
    first = _load(hand_made)
    assert children == [model_dir] and first.reference_source == "child"
    # The child kept what it made, bound to the files it made it from.
    rows, _, binding = _stored(model_dir)
    assert binding["native_sha256"] == sha256_file(model_dir / "lightgbm_model.txt")
    assert binding["onnx_sha256"] == sha256_file(model_dir / ONNX_FILE)
    assert rows.shape == (PARITY_PROBE_ROWS, len(features.FEATURE_NAMES))
    kept = _inode(model_dir / PARITY_FILE)

    second = _load(hand_made)
    assert children == [model_dir]  # no new child
    assert _inode(model_dir / PARITY_FILE) == kept  # and nothing rewrote the reference
    assert second.reference_source == "stored"
    # The check ran again in this process, on the same rows, with the same outcome.
    assert second.parity_max_difference == first.parity_max_difference
    assert second.parity_max_difference is not None and second.parity_max_difference <= 1e-5


def test_a_reference_made_with_another_probe_size_is_made_again(hand_made, children) -> None:
    model_dir = hand_made / "model_1"
    _load(hand_made)
    _load(hand_made, parity_probe_rows=300)
    assert len(children) == 2
    rows, _, binding = _stored(model_dir)
    assert binding["rows"] == 300 and len(rows) == 300
    _load(hand_made, parity_probe_rows=300)
    assert len(children) == 2


def test_a_reference_bound_to_another_versions_files_is_made_again(
    hand_made: Path, candles, children
) -> None:
    other = write_model(
        hand_made.parent / "other", "model_1", "lightgbm", candles, trees=25, seed=9
    )
    _load(hand_made.parent / "other")
    assert len(children) == 1
    # The other version's reference (valid in itself) copied beside this version's files.
    model_dir = hand_made / "model_1"
    _load(hand_made)
    shutil.copy2(other / PARITY_FILE, model_dir / PARITY_FILE)
    loaded = _load(hand_made)
    assert len(children) == 3 and loaded.reference_source == "child"
    assert loaded.parity_max_difference is not None and loaded.parity_max_difference <= 1e-5
    _, _, binding = _stored(model_dir)
    assert binding["native_sha256"] == sha256_file(model_dir / "lightgbm_model.txt")
    assert _load(hand_made).reference_source == "stored"
    assert len(children) == 3


@pytest.mark.parametrize("damage", ["arrays", "library", "converter", "garbage", "symlink"])
def test_a_reference_that_does_not_check_out_is_made_again(
    hand_made: Path, children, damage: str
) -> None:
    model_dir = hand_made / "model_1"
    _load(hand_made)
    rows, reference, binding = _stored(model_dir)
    path = model_dir / PARITY_FILE
    if damage == "arrays":  # one probability changed, the binding (and its sha256) as it was
        reference = reference.copy()
        reference[0] = 1.0 - reference[0]
        _rewrite(model_dir, rows, reference, binding)
    elif damage in ("library", "converter"):  # consistent in itself, made with other versions
        key = {"library": "native_library", "converter": "converter_version"}[damage]
        binding[key] = "lightgbm 0.0" if damage == "library" else CONVERTER_VERSION + "-old"
        _rewrite(model_dir, rows, reference, binding)
    elif damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        real = model_dir.parent / "elsewhere.npz"
        path.rename(real)
        path.symlink_to(real)
    if damage == "symlink":  # a link is not a model file: the directory is refused outright
        with pytest.raises(ModelLoadError, match="not a regular file"):
            _load(hand_made)
        return
    loaded = _load(hand_made)
    assert len(children) == 2 and loaded.reference_source == "child"
    assert loaded.parity_max_difference is not None and loaded.parity_max_difference <= 1e-5
    assert _load(hand_made).reference_source == "stored"


def _stamped_as_converted_from(onnx_path: Path, native: Path) -> None:
    """Claim ``onnx_path`` was converted from ``native`` by this converter (what a converter
    bug would leave: an ONNX file taken as current that does not compute the native model)."""
    model = onnx.load(str(onnx_path))
    onnx.helper.set_model_props(
        model, {NATIVE_SHA256_KEY: sha256_file(native), CONVERTER_VERSION_KEY: CONVERTER_VERSION}
    )
    onnx.save(model, str(onnx_path))


def test_a_stored_reference_still_catches_an_onnx_that_disagrees(
    hand_made: Path, candles, children
) -> None:
    other = write_model(
        hand_made.parent / "other", "model_1", "lightgbm", candles, trees=25, seed=9
    )
    _load(hand_made.parent / "other")  # converts it: other/model.onnx
    model_dir = hand_made / "model_1"
    shutil.copy2(other / ONNX_FILE, model_dir / ONNX_FILE)
    _stamped_as_converted_from(model_dir / ONNX_FILE, model_dir / "lightgbm_model.txt")
    children.clear()

    with pytest.raises(ModelLoadError, match=r"differ by .*made by a child.*refusing to serve"):
        _load(hand_made)
    assert children == [model_dir]
    # The child kept the native side for exactly this pair of files...
    _, _, binding = _stored(model_dir)
    assert binding["onnx_sha256"] == sha256_file(model_dir / ONNX_FILE)
    # ...and the next load, with no child, refuses just the same: the check runs every time.
    with pytest.raises(ModelLoadError, match=r"differ by .*from parity\.npz.*refusing to serve"):
        _load(hand_made)
    assert children == [model_dir]


def _train(root: Path, model_type: str, candles) -> Path:
    x, y = training_rows(candles)
    cut = int(len(y) * 0.8)
    model = make_model(
        model_type,
        {"n_estimators": 25, "early_stopping_rounds": 25},
        feature_names=list(features.FEATURE_NAMES),
        num_threads=2,
    )
    model.fit(x[:cut], y[:cut], x[cut:], y[cut:])
    meta = ModelMetadata(
        name="model_1",
        model_type=model_type,
        version=1,
        training_samples=cut,
        trained_at="2026-11-30T00:00:00Z",
        feature_names=list(features.FEATURE_NAMES),
        lookback=features.LOOKBACK_PERIODS,
        features_hash=features.feature_definitions_hash(),
    )
    write_model_dir(root / "model_1", model, meta)
    return root / "model_1"


@pytest.mark.parametrize("model_type", ["lightgbm", "xgboost", "catboost"])
def test_training_writes_the_reference_and_the_first_load_needs_no_child(
    tmp_path: Path, candles, children, model_type: str
) -> None:
    model_dir = _train(tmp_path / "models", model_type, candles)
    assert (model_dir / PARITY_FILE).is_file()
    verify_model_dir(model_dir)  # the extra file passes the history's verification
    loaded = _load(tmp_path / "models")
    assert children == [] and loaded.reference_source == "stored"
    assert loaded.parity_max_difference is not None and loaded.parity_max_difference <= 1e-5
    # What training stored is what the server's own child makes from these files.
    rows, reference, _ = _stored(model_dir)
    meta = ModelMetadata.read(model_dir)
    made = model_store.native_reference(meta, model_dir, PARITY_PROBE_ROWS)
    np.testing.assert_array_equal(made.rows, rows)
    np.testing.assert_allclose(made.probabilities, reference, rtol=0, atol=1e-12)


def test_the_reference_is_outside_the_checksums_and_travels_in_backups(
    tmp_path: Path, candles
) -> None:
    model_dir = _train(tmp_path / "models", "lightgbm", candles)
    meta = ModelMetadata.read(model_dir)
    assert PARITY_FILE not in meta.checksums
    with pytest.raises(MetadataError, match="not a model file"):
        dataclasses.replace(meta, checksums={PARITY_FILE: "0" * 64})
    archive = backup(model_dir, tmp_path / "backup.tar.gz")
    into = tmp_path / "check"
    into.mkdir()
    verify_archive(archive, into)
    assert (into / PARITY_FILE).read_bytes() == (model_dir / PARITY_FILE).read_bytes()
    # A version kept without the reference and the same version restored with it are one
    # version: restoring does not refuse it as "different files".
    kept = tmp_path / "models" / ".versions" / "model_1" / "1"
    kept.parent.mkdir(parents=True)
    shutil.copytree(model_dir, kept)
    (kept / PARITY_FILE).unlink()
    assert restore(archive, tmp_path / "models").version == 1


def test_back_to_back_swaps_start_a_child_only_for_files_never_loaded(
    two_versions: Path, children, caplog: pytest.LogCaptureFixture
) -> None:
    models = two_versions / "models"
    server = InProcessServer(learning_settings(two_versions))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            for version in (2, 1, 2, 1):
                with caplog.at_level(logging.INFO, logger="xylen_server"):
                    reply = stub.RollbackModel(
                        pb.RollbackModelRequest(version=version), timeout=120
                    )
                assert reply.model_info.version == version
    finally:
        server.close()
    # The start-up load (the serving directory, kept as v1 with its reference) and the first
    # swap to v2 (its kept directory had none); the other three swaps started no child.
    assert children == [models / "model_1", models / ".versions" / "model_1" / "2"]
    assert (models / ".versions" / "model_1" / "2" / PARITY_FILE).is_file()
    swaps = [r.getMessage() for r in caplog.records if "now serving" in r.getMessage()]
    assert len(swaps) == 4
    assert all("reference " in line and "session " in line for line in swaps)
