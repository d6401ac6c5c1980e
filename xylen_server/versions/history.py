"""Model versions on disk: the serving directory, the kept history, backup and restore archives.

Layout under ``MODEL_PATH`` (what training writes and the server loads stays where it was)::

    <name>/                      the serving model (native file, model.onnx, metadata.json, ...)
    .versions/<name>/<version>/  the last MODEL_HISTORY_KEEP versions, each a complete model
                                 directory (the serving version is always among them)
    .versions/<name>/.candidate-<job id>/   a retrain's candidate while it is being validated

A kept version's files are never changed, with one exception: the server's parity reference child
adds ``parity.npz`` (:data:`training.metadata.PARITY_FILE`) to a version that has none the first
time it loads it, so the next rollback to it needs no child. It is derived from the version's own
files and bound to their sha256, so it is outside the metadata's checksums; backups carry it
(the manifest lists every file).

Every change of the serving directory is a rename of a complete directory
(:func:`training.metadata.atomic_directory`), so a crash leaves the old or the new model, never a
mix; the history copy is written first, so the serving version is always kept. Versions are
monotonic over the serving directory and the history together (:func:`next_version`), so a
retrain after a rollback never reuses a number.

A backup archive (``xylen-server model backup``) is one ``.tar.gz`` holding ``MANIFEST.json``
(model name, version and the sha256 of every file) and the model's files under
``<name>-v<version>/``. :func:`restore` extracts it into a temporary directory, refuses anything
but plain files, checks every sha256 against the manifest and the metadata's own checksums, and
only then installs it (history first, then the serving directory).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from training.metadata import (
    MAX_MODEL_FILE_BYTES,
    MAX_SMALL_FILE_BYTES,
    METADATA_FILE,
    MODEL_FILES,
    PARITY_FILE,
    MetadataError,
    ModelMetadata,
    atomic_directory,
    check_model_dir,
    sha256_file,
)
from xylen_server.errors import FailedPrecondition, HistoryError, VersionNotFound

logger = logging.getLogger(__name__)

MANIFEST_FILE = "MANIFEST.json"
"""Name of the manifest inside a backup archive."""


@dataclass(frozen=True)
class KeptVersion:
    """One version in the history directory."""

    version: int
    path: Path
    meta: ModelMetadata


def history_dir(model_path: Path, name: str) -> Path:
    """``<model_path>/.versions/<name>``."""
    return Path(model_path) / ".versions" / name


def verify_model_dir(model_dir: Path, digests: dict[str, str] | None = None) -> ModelMetadata:
    """Read the metadata and check every file it lists a sha256 for; raises HistoryError.
    The sha256 of each file hashed goes into ``digests`` when given (a rollback hands them to
    the load that follows, so no file is hashed twice in one swap)."""
    try:
        check_model_dir(model_dir)
        meta = ModelMetadata.read(model_dir)
    except MetadataError as exc:
        raise HistoryError(str(exc)) from None
    if not meta.checksums:
        raise HistoryError(f"{model_dir}: metadata lists no checksums; cannot verify the model")
    problem = meta.checksum_problem(model_dir, digests=digests)
    if problem is not None:
        raise HistoryError(problem)
    return meta


def list_versions(history: Path) -> list[KeptVersion]:
    """Kept versions, newest first (directories whose metadata cannot be read are skipped)."""
    kept = []
    if history.is_dir():
        for path in history.iterdir():
            if not (path.is_dir() and path.name.isdigit()):
                continue
            try:
                meta = ModelMetadata.read(path)
            except MetadataError:
                logger.warning("%s has no readable metadata; ignored", path)
                continue
            kept.append(KeptVersion(meta.version, path, meta))
    return sorted(kept, key=lambda k: k.version, reverse=True)


def find_version(history: Path, version: int) -> KeptVersion:
    """The kept ``version``; raises VersionNotFound when it is not kept."""
    for kept in list_versions(history):
        if kept.version == version:
            return kept
    available = ", ".join(str(k.version) for k in list_versions(history)) or "none"
    raise VersionNotFound(f"version {version} is not kept (kept: {available})", version=version)


def rollback_target(history: Path, current: ModelMetadata, version: int = 0) -> int:
    """The version a rollback from ``current`` goes to: ``version`` when given, else the
    serving model's parent when it is kept, else the newest kept version below it. Raises
    VersionNotFound when there is none, FailedPrecondition when it is the serving one."""
    if version == 0:
        below = [k.version for k in list_versions(history) if k.version < current.version]
        if current.parent_version and current.parent_version in below:
            version = current.parent_version
        elif below:
            version = max(below)
        else:
            raise VersionNotFound(f"no kept version below v{current.version} to roll back to")
    if version == current.version:
        raise FailedPrecondition(f"v{version} is already serving", reason="VERSION_ALREADY_SERVING")
    return version


def next_version(model_dir: Path, history: Path) -> int:
    """One more than the highest version of the serving directory and the history."""
    versions = [k.version for k in list_versions(history)]
    with contextlib.suppress(MetadataError):
        versions.append(ModelMetadata.read(model_dir).version)
    return max(versions, default=0) + 1


def _model_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))


def _copy_into(source: Path, target: Path) -> None:
    for path in _model_files(source):
        shutil.copy2(path, target / path.name)


def archive(model_dir: Path, history: Path) -> Path:
    """Copy the model in ``model_dir`` into ``history/<version>/`` unless it is kept already."""
    meta = ModelMetadata.read(model_dir)
    target = history / str(meta.version)
    if target.is_dir():
        return target
    with atomic_directory(target) as tmp:
        _copy_into(model_dir, tmp)
    return target


def adopt(directory: Path, history: Path, version: int) -> Path:
    """Move a complete model directory (a candidate) into ``history/<version>/``."""
    target = history / str(version)
    if target.exists():
        raise HistoryError(f"{target} exists already; versions are never overwritten")
    directory.chmod(0o755)
    os.rename(directory, target)
    return target


def install_serving(source: Path, model_dir: Path) -> None:
    """Make ``model_dir`` an exact copy of the model in ``source`` (atomic rename)."""
    with atomic_directory(model_dir) as tmp:
        _copy_into(source, tmp)


def prune(history: Path, keep: int, protect: int | None = None) -> list[int]:
    """Delete all but the ``keep`` newest versions (never ``protect``); returns those deleted."""
    deleted = []
    for kept in list_versions(history)[keep:]:
        if kept.version == protect:
            continue
        shutil.rmtree(kept.path, ignore_errors=True)
        deleted.append(kept.version)
    return deleted


# -- backup and restore -----------------------------------------------------------------------


def backup(model_dir: Path, out: Path) -> Path:
    """Write ``out`` (.tar.gz): ``MANIFEST.json`` and every model file, after verifying them."""
    meta = verify_model_dir(model_dir)
    files = _model_files(model_dir)
    manifest = {
        "name": meta.name,
        "version": meta.version,
        "files": {path.name: sha256_file(path) for path in files},
    }
    prefix = f"{meta.name}-v{meta.version}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        info = tarfile.TarInfo(MANIFEST_FILE)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
        for path in files:
            tar.add(path, arcname=f"{prefix}/{path.name}", recursive=False)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, out)
    return out


def verify_archive(archive_path: Path, into: Path) -> ModelMetadata:
    """Extract ``archive_path`` into the empty directory ``into`` (model files only) and verify
    it: plain files, no path tricks, every sha256 as the manifest and the metadata say."""
    try:
        tar = tarfile.open(archive_path, "r:gz")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as exc:
        raise HistoryError(f"{archive_path} is not a readable backup archive: {exc}") from exc
    with tar:
        try:
            members = tar.getmembers()
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise HistoryError(f"{archive_path} is truncated or corrupt: {exc}") from exc
        manifest_member = next((m for m in members if m.name == MANIFEST_FILE), None)
        if manifest_member is None:
            raise HistoryError(f"{archive_path} has no {MANIFEST_FILE}")
        if not manifest_member.isfile() or manifest_member.size > MAX_SMALL_FILE_BYTES:
            raise HistoryError(f"{archive_path}: {MANIFEST_FILE} is not a small plain file")
        try:
            manifest = json.load(tar.extractfile(manifest_member))  # type: ignore[arg-type]
            prefix = f"{manifest['name']}-v{int(manifest['version'])}/"
            expected: dict[str, str] = dict(manifest["files"])
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise HistoryError(f"{archive_path}: unreadable manifest: {str(exc)[:200]}") from None
        seen: set[str] = set()
        for member in members:
            if member.name == MANIFEST_FILE:
                continue
            name = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            if not member.isfile() or not name or "/" in name or name.startswith("."):
                raise HistoryError(f"{archive_path}: unexpected entry {member.name!r}")
            if name not in expected:
                raise HistoryError(f"{archive_path}: {name[:64]!r} is not in the manifest")
            if name not in MODEL_FILES:
                raise HistoryError(f"{archive_path}: {name[:64]!r} is not a model file")
            limit = MAX_SMALL_FILE_BYTES if name == METADATA_FILE else MAX_MODEL_FILE_BYTES
            if member.size > limit:
                raise HistoryError(
                    f"{archive_path}: {name} is {member.size} bytes, over the limit of {limit}"
                )
            source = tar.extractfile(member)
            assert source is not None
            with source, open(into / name, "wb") as target:
                shutil.copyfileobj(source, target)
            os.chmod(into / name, 0o644)
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise HistoryError(f"{archive_path}: missing files {', '.join(missing)}")
    for name, digest in expected.items():
        actual = sha256_file(into / name)
        if actual != digest:
            raise HistoryError(
                f"{archive_path}: {name} has sha256 {actual[:12]}, the manifest says "
                f"{digest[:12]}; the archive was altered or damaged"
            )
    if METADATA_FILE not in expected:
        raise HistoryError(f"{archive_path}: no {METADATA_FILE}")
    meta = verify_model_dir(into)
    if meta.name != manifest["name"] or meta.version != int(manifest["version"]):
        raise HistoryError(f"{archive_path}: manifest and metadata disagree on name or version")
    return meta


def restore(archive_path: Path, model_path: Path, name: str | None = None) -> ModelMetadata:
    """Verify the archive, then keep it in the history and make it the serving model of
    ``name`` (default: the name in the archive). Nothing is touched unless it verifies."""
    model_path = Path(model_path)
    model_path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=model_path))
    try:
        meta = verify_archive(Path(archive_path), staging)
        name = name or meta.name
        if meta.name != name:
            raise HistoryError(f"the archive holds model {meta.name!r}, not {name!r}")
        history = history_dir(model_path, name)
        history.mkdir(parents=True, exist_ok=True)
        kept = history / str(meta.version)
        if kept.is_dir():
            # parity.npz is derived (and bound to the files it came from): one side may have
            # it and the other not, and still be the same version.
            same = all(
                (kept / f).is_file() and sha256_file(kept / f) == sha256_file(staging / f)
                for f in (p.name for p in _model_files(staging))
                if f != PARITY_FILE
            )
            if not same:
                raise HistoryError(
                    f"version {meta.version} of {name} is kept already with different files; "
                    "refusing to overwrite a version"
                )
        else:
            with atomic_directory(kept) as tmp:
                _copy_into(staging, tmp)
        install_serving(kept, model_path / name)
        return meta
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def rollback_files(model_path: Path, name: str, version: int) -> ModelMetadata:
    """Make the kept ``version`` the serving model on disk (the CLI without a server)."""
    history = history_dir(model_path, name)
    model_dir = Path(model_path) / name
    if model_dir.is_dir():
        try:
            archive(model_dir, history)
        except (MetadataError, OSError) as exc:
            raise HistoryError(f"cannot keep the serving model before rollback: {exc}") from exc
    kept = find_version(history, version)
    meta = verify_model_dir(kept.path)
    install_serving(kept.path, model_dir)
    return meta
