"""Model directories from outside are validated before anything is swapped: a schema for
metadata.json, only model files, size limits, nothing outside the folder, no blocking on
special files. A bad one is refused with one line and the serving model is untouched: at
start-up (exit 2, no traceback), on ReloadModel (FAILED_PRECONDITION, no swap) and on restore.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from errorinfo import error_info
from harness import InProcessServer, server_settings, start_server

from training.metadata import METADATA_FILE, MetadataError, ModelMetadata, check_model_dir
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.errors import HistoryError, ModelLoadError
from xylen_server.serving.model_store import load_model
from xylen_server.versions import history


def _edit(key: str, value: object) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        raw[key] = value

    return edit


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


#: metadata.json edits the schema refuses (each as an outsider sent them).
BAD_METADATA: dict[str, Callable[[dict], None]] = {
    "version-string": _edit("version", "2"),
    "version-bool": _edit("version", True),
    "version-huge": _edit("version", 2**70),
    "trained_at-int": _edit("trained_at", 5),
    "trained_at-garbage": _edit("trained_at", "yesterday"),
    "trained_at-year-10000": _edit("trained_at", "10000-01-01T00:00:00Z"),
    "trained_at-overflow": _edit("trained_at", "9999-12-31T23:00:00-05:00"),
    "trained_at-year-1": _edit("trained_at", "0001-01-01T00:00:00+05:00"),
    "horizon-string": _edit("horizon", "four"),
    "horizon-zero": _edit("horizon", 0),
    "parent_version-string": _edit("parent_version", "abc"),
    "parent_version-negative": _edit("parent_version", -1),
    "feature_names-string": _edit("feature_names", "abc"),
    "lookback-float": _edit("lookback", 100.5),
    "fee-nan": _edit("fee", float("nan")),
    "name-path": _edit("name", "../model_2"),
    "metrics-list": _edit("metrics", [1, 2]),
    "metrics-deep": _edit("metrics", _nested(40)),
    "checksums-outside": _edit("checksums", {"../outside.bin": "0" * 64}),
    "checksums-absolute": _edit("checksums", {"/etc/passwd": "0" * 64}),
    "checksums-not-hex": _edit("checksums", {"lightgbm_model.txt": "xyz"}),
    "unknown-key": _edit("surprise", 1),
}


@pytest.fixture
def model_copy(models_root: Path, tmp_path: Path) -> Path:
    """A private copy of the trained model tree (``<tmp>/models/model_1``)."""
    target = tmp_path / "models"
    shutil.copytree(models_root / "model_1", target / "model_1")
    return target


def _rewrite(model_dir: Path, edit: Callable[[dict], None]) -> None:
    path = model_dir / METADATA_FILE
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _load(models: Path, **overrides: object) -> None:
    """load_model on a worker thread, failing the test if it blocks."""
    settings = server_settings(models, parity_probe_rows=64, **overrides)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(load_model, settings).result(timeout=60)


def _refused(models: Path, **overrides: object) -> str:
    with pytest.raises(ModelLoadError) as caught:
        _load(models, **overrides)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600, message
    return message


def test_the_copy_loads(model_copy):
    _load(model_copy)  # the baseline every refusal below differs from by one thing


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_metadata_schema_refusals(model_copy, case):
    _rewrite(model_copy / "model_1", BAD_METADATA[case])
    _refused(model_copy)
    with pytest.raises(MetadataError):
        ModelMetadata.read(model_copy / "model_1")


def test_metadata_nested_beyond_the_parser(model_copy):
    (model_copy / "model_1" / METADATA_FILE).write_text("[" * 200_000 + "]" * 200_000)
    assert "nested too deeply" in _refused(model_copy)


def test_a_fifo_in_place_of_metadata_is_refused_not_waited_on(model_copy):
    path = model_copy / "model_1" / METADATA_FILE
    path.unlink()
    os.mkfifo(path)
    assert "not a regular file" in _refused(model_copy)
    with pytest.raises(MetadataError):
        ModelMetadata.read(model_copy / "model_1")  # alone too, without the directory check


def test_the_loader_never_reads_outside_the_folder(model_copy, tmp_path):
    # a FIFO outside: a loader that opened it would block (the test would time out)
    outside = tmp_path / "outside.bin"
    os.mkfifo(outside)
    model_dir = model_copy / "model_1"
    meta = ModelMetadata.read(model_dir)
    native = model_dir / meta.native_file
    native.unlink()
    native.symlink_to(outside)
    assert "not a regular file" in _refused(model_copy)
    raw = json.loads((model_dir / METADATA_FILE).read_text())
    raw["checksums"] = {str(outside): "0" * 64}
    with pytest.raises(MetadataError):
        ModelMetadata.from_dict(raw)


@pytest.mark.parametrize("extra", ["padding.bin", "notes.txt", "lightgbm_model.txt.bak"])
def test_extra_files_are_refused(model_copy, extra):
    (model_copy / "model_1" / extra).write_bytes(b"\0" * 1000)
    assert extra in _refused(model_copy)


def test_a_directory_or_fifo_among_the_files_is_refused(model_copy):
    (model_copy / "model_1" / "model.onnx").unlink(missing_ok=True)
    os.mkfifo(model_copy / "model_1" / "model.onnx")
    assert "not a regular file" in _refused(model_copy)
    os.unlink(model_copy / "model_1" / "model.onnx")
    (model_copy / "model_1" / "model.onnx").mkdir()
    assert "not a regular file" in _refused(model_copy)


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(model_copy):
    meta = ModelMetadata.read(model_copy / "model_1")
    size = (model_copy / "model_1" / meta.native_file).stat().st_size
    message = _refused(model_copy, model_max_file_bytes=max(1024, size // 2))
    assert "over the limit" in message
    huge = model_copy / "model_1" / METADATA_FILE
    huge.write_text(json.dumps({"pad": "x" * (2 << 20)}))
    assert "over the limit" in _refused(model_copy)


def test_hidden_temporary_files_are_left_alone(model_copy):
    os.mkfifo(model_copy / "model_1" / ".metadata.json.tmp123")
    check_model_dir(model_copy / "model_1")
    _load(model_copy)


# -- at start-up, on ReloadModel, on restore --------------------------------------------------


def test_start_up_with_bad_metadata_exits_2_with_one_line(model_copy, tmp_path):
    path = model_copy / "model_1" / METADATA_FILE
    raw = json.loads(path.read_text())
    raw["metrics"] = "DEEP"
    deep = '{"a":' * 5000 + "{}" + "}" * 5000
    path.write_text(json.dumps(raw).replace('"DEEP"', deep))
    server = start_server(model_copy, wait=False, env={"FEEDBACK_DATA_DIR": str(tmp_path / "d")})
    assert server.proc.wait(60) == 2
    log = server.log()
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if line.startswith("xylen-server: error:")]
    assert len(errors) == 1 and "nested" in errors[0], log


@pytest.fixture
def live(
    model_copy: Path, tmp_path: Path
) -> Iterator[tuple[InProcessServer, pb_grpc.ModelServiceStub]]:
    server = InProcessServer(
        server_settings(model_copy, parity_probe_rows=64, feedback_data_dir=tmp_path / "d")
    )
    with grpc.insecure_channel(server.address) as channel:
        yield server, pb_grpc.ModelServiceStub(channel)
    server.close()


@pytest.mark.parametrize(
    "spoil",
    ["trained_at", "parent_version", "horizon", "fifo", "extra", "deep"],
)
def test_reload_with_bad_metadata_answers_a_status_and_swaps_nothing(live, model_copy, spoil):
    server, stub = live
    before = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_info
    model_dir = model_copy / "model_1"
    edits = {
        "trained_at": _edit("trained_at", "not a time"),
        "parent_version": _edit("parent_version", "one"),
        "horizon": _edit("horizon", -3),
        "deep": _edit("params", _nested(100)),
    }
    if spoil in edits:
        _rewrite(model_dir, lambda raw: (raw.update(version=raw["version"] + 1), edits[spoil](raw)))
    elif spoil == "fifo":
        (model_dir / METADATA_FILE).unlink()
        os.mkfifo(model_dir / METADATA_FILE)
    else:
        (model_dir / "padding.bin").write_bytes(b"\0" * 4096)
        _rewrite(model_dir, lambda raw: raw.update(version=raw["version"] + 1))
    with pytest.raises(grpc.RpcError) as caught:
        stub.ReloadModel(pb.ReloadModelRequest(), timeout=30)
    error = caught.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert error_info(error).reason == "MODEL_LOAD_FAILED"
    assert len(error.details()) < 600
    after = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_info
    assert after == before
    assert server.model.meta.version == before.version


def _archive(model_dir: Path, out: Path, extra: dict[str, bytes]) -> Path:
    """A backup archive of ``model_dir`` with ``extra`` files listed in its manifest."""
    history.backup(model_dir, out)
    patched = out.with_name("patched-" + out.name)
    with tarfile.open(out, "r:gz") as tar, tarfile.open(patched, "w:gz") as new:
        prefix = ""
        for member in tar.getmembers():
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == history.MANIFEST_FILE:
                manifest = json.loads(data)
                prefix = f"{manifest['name']}-v{manifest['version']}/"
                import hashlib

                for name, content in extra.items():
                    manifest["files"][name] = hashlib.sha256(content).hexdigest()
                data = json.dumps(manifest).encode()
            member.size = len(data)
            new.addfile(member, io.BytesIO(data))
        for name, content in extra.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(content)
            new.addfile(info, io.BytesIO(content))
    return patched


@pytest.mark.parametrize("extra", ["padding.bin", "model.onnx.orig"])
def test_restore_refuses_extra_files_and_installs_nothing(model_copy, tmp_path, extra):
    archive = _archive(model_copy / "model_1", tmp_path / "b.tar.gz", {extra: b"\0" * 100_000})
    target = tmp_path / "restored"
    with pytest.raises(HistoryError) as caught:
        history.restore(archive, target)
    assert "not a model file" in str(caught.value)
    assert not (target / "model_1").exists()
