"""Model metadata: the one description of a trained model, written by training, read by serving.

It also fixes how every engine is fed (:func:`model_input`, the graph's input and output
names), so training, conversion and serving agree without importing each other.

A model directory (``models/<name>/``) holds the native model file of its type, optionally a
``model.onnx`` converted from it and a ``parity.npz`` (:data:`PARITY_FILE`, the native side of
the parity check, kept so a load needs no native library), ``feature_importance.csv`` and
``metadata.json`` (this class).
The server refuses a model whose ``feature_names``, ``lookback`` or ``features_hash`` disagree with
the feature code it runs (see :mod:`training.features`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import json
import math
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from training.calibration import CalibrationError
from training.calibration import check as check_calibration

METADATA_FILE = "metadata.json"
ONNX_FILE = "model.onnx"
FEATURE_IMPORTANCE_FILE = "feature_importance.csv"
PARITY_FILE = "parity.npz"
"""The parity reference kept with a model: the probe rows of the ONNX-vs-native check and the
native model's P(up) on them (see :func:`write_parity_reference`). Derived from the native and
ONNX files and bound to their sha256, so it is not in :attr:`ModelMetadata.checksums`."""

#: Native model file name per model type (``lightgbm_model.txt``: the name operators' LightGBM
#: tooling already writes).
NATIVE_FILES: dict[str, str] = {
    "lightgbm": "lightgbm_model.txt",
    "xgboost": "xgboost_model.json",
    "catboost": "catboost_model.cbm",
}
MODEL_TYPES = tuple(NATIVE_FILES)
#: The only files a model directory may hold (names starting with "." are ignored: the
#: temporary files of an interrupted atomic write).
MODEL_FILES = frozenset(
    {METADATA_FILE, ONNX_FILE, FEATURE_IMPORTANCE_FILE, PARITY_FILE, *NATIVE_FILES.values()}
)
#: The files :attr:`ModelMetadata.checksums` may name: what training writes once and for good
#: (``parity.npz`` is derived, may be added after training and carries its own binding).
CHECKSUMMED_FILES = MODEL_FILES - {METADATA_FILE, PARITY_FILE}
#: Largest ``metadata.json`` and ``feature_importance.csv`` read.
MAX_SMALL_FILE_BYTES = 1 << 20
#: Default largest native model or ONNX file (the server's ``MODEL_MAX_FILE_BYTES``).
MAX_MODEL_FILE_BYTES = 256 << 20
#: Deepest nesting of ``data``, ``metrics`` and ``params``.
MAX_METADATA_DEPTH = 16
#: Longest name, symbol, interval, hash or ``trained_at`` text.
MAX_METADATA_TEXT = 128
_MAX_INT = 2**53

#: Name of the ONNX graph's input: float32 ``[batch, features]`` (batch dimension dynamic).
INPUT_NAME = "input"
#: Name of the ONNX graph's output: float32 ``[batch, 2]``, P(down) and P(up).
PROBABILITIES_OUTPUT = "probabilities"
#: Largest allowed |onnx - native| difference in P(up) on the parity probe.
PARITY_TOLERANCE = 1e-5
#: Rows of the parity probe (the server's default ``PARITY_PROBE_ROWS``, and what training
#: stores in ``parity.npz``).
PARITY_PROBE_ROWS = 2048
#: Bumped whenever the conversion to ONNX changes, so older ``model.onnx`` files (and the
#: parity references bound to them) are made again (:mod:`training.onnx_export`).
CONVERTER_VERSION = "1"
#: Bumped whenever the probe rows are chosen differently (:func:`training.parity.probe_rows`),
#: so stored parity references are made again.
PARITY_PROBE_VERSION = "1"
#: LightGBM reads any |x| <= 1e-35 as 0 (its kZeroThreshold) and places splits at +-1e-35
#: between 0 and the nearest values; ONNX compares such values as they are.
ZERO_THRESHOLD = 1e-35
_ZERO_THRESHOLD_F32 = np.float32(ZERO_THRESHOLD)
"""The threshold as the float32 the comparison with float32 rows rounds it to anyway (numpy
converts a Python float to the array's type per call)."""


def model_input(rows: np.ndarray) -> np.ndarray:
    """The one input convention every engine sees: float32, with LightGBM's zero snapping
    applied, so ONNX and native engines branch the same way on every value."""
    out = np.array(rows, dtype=np.float32)  # always a copy
    tiny = np.abs(out) <= _ZERO_THRESHOLD_F32
    if np.count_nonzero(tiny):  # a third of tiny.any()'s cost on a served row
        out[tiny] = 0.0
    return out


class MetadataError(ValueError):
    """The metadata file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class ModelMetadata:
    """Everything a server and an operator need to know about one trained model."""

    name: str
    """Model name, also the directory name under ``models/`` (for example ``model_1``)."""
    model_type: str
    """One of :data:`MODEL_TYPES`."""
    version: int
    """Monotonic version, 1 for the first model of this name."""
    training_samples: int
    """Rows the model was fitted on."""
    trained_at: str
    """ISO-8601 UTC time the training run finished, e.g. ``2026-11-30T02:00:00Z``."""
    feature_names: list[str]
    """Model input columns, in order."""
    lookback: int
    """Candles a window needs for one feature row (``LOOKBACK_PERIODS`` at training time)."""
    features_hash: str
    """sha256 of the feature definitions the model was trained with."""
    parent_version: int | None = None
    """Version this model was retrained from, if any."""
    horizon: int = 1
    """Label horizon in bars."""
    fee: float = 0.0
    """Round-trip fee (fraction) netted from the forward return when labelling."""
    label_threshold: float = 0.0
    """Net forward return above which a row is labelled up."""
    symbol: str = ""
    interval: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    """Training data: ``start``/``end`` (ISO) and ``files`` (list of ``{path, sha256}``)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Validation and test metrics, baselines included."""
    params: dict[str, Any] = field(default_factory=dict)
    """Model hyper-parameters as trained."""
    checksums: dict[str, str] = field(default_factory=dict)
    """sha256 of model files by file name (the native file at least); the server verifies them
    before loading, since some libraries crash rather than fail on a truncated file."""
    signal_thresholds: dict[str, Any] = field(default_factory=dict)
    """The model's BUY / SELL probability thresholds and how they were chosen
    (:mod:`training.thresholds`): ``buy``, ``sell``, ``rule``, ``min_share``, ``max_share`` and
    the ``validation`` figures behind them. Empty in models trained before thresholds were
    chosen per model: the server then applies its defaults (0.55 / 0.45)."""
    calibration: dict[str, Any] = field(default_factory=dict)
    """The map from the engine's raw P(up) to the served, calibrated one
    (:mod:`training.calibration`): ``method`` ``"platt"``, ``a`` > 0, ``b``, and the
    ``validation`` figures it was fitted on. ``signal_thresholds`` are on the calibrated scale.
    Empty in models trained before calibration: the identity."""

    def __post_init__(self) -> None:
        """The schema: every field's type and range, checked when the metadata is read, so a
        bad file is refused at load rather than failing later (GetModelInfo, a swap)."""
        _text(self.name, "name")
        if "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise MetadataError(f"name must be a plain directory name, got {self.name[:64]!r}")
        if self.model_type not in NATIVE_FILES:
            raise MetadataError(
                f"model_type {str(self.model_type)[:64]!r} is not one of {', '.join(MODEL_TYPES)}"
            )
        _integer(self.version, "version", 1)
        _integer(self.training_samples, "training_samples", 0)
        _text(self.trained_at, "trained_at")
        try:
            parsed_at = datetime.fromisoformat(self.trained_at.replace("Z", "+00:00"))
        except ValueError:
            raise MetadataError(f"trained_at {self.trained_at!r} is not an ISO-8601 time") from None
        try:
            if parsed_at.tzinfo is not None:
                parsed_at = parsed_at.astimezone(UTC)
        except (OverflowError, ValueError):
            parsed_at = parsed_at.replace(year=1)
        if not 1970 <= parsed_at.year <= 9998:
            raise MetadataError(f"trained_at {self.trained_at!r} is outside 1970..9998 (UTC)")
        if not isinstance(self.feature_names, list) or not self.feature_names:
            raise MetadataError("feature_names must be a non-empty list")
        if len(self.feature_names) > 4096:
            raise MetadataError(f"feature_names has {len(self.feature_names)} entries (max 4096)")
        for name in self.feature_names:
            _text(name, "feature_names[]")
        _integer(self.lookback, "lookback", 1, 1_000_000)
        _text(self.features_hash, "features_hash")
        if self.parent_version is not None:
            _integer(self.parent_version, "parent_version", 0)
        _integer(self.horizon, "horizon", 1, 1_000_000)
        _number(self.fee, "fee")
        _number(self.label_threshold, "label_threshold")
        _text(self.symbol, "symbol", allow_empty=True)
        _text(self.interval, "interval", allow_empty=True)
        for key in ("data", "metrics", "params"):
            value = getattr(self, key)
            if not isinstance(value, dict):
                raise MetadataError(f"{key} must be a JSON object, got {type(value).__name__}")
            _json_value(value, key, 1)
        if not isinstance(self.checksums, dict):
            raise MetadataError("checksums must be a JSON object")
        for file, digest in self.checksums.items():
            if not isinstance(file, str) or file not in CHECKSUMMED_FILES:
                raise MetadataError(
                    f"checksums name {str(file)[:64]!r}, not a model file "
                    f"({', '.join(sorted(CHECKSUMMED_FILES))})"
                )
            if not (
                isinstance(digest, str)
                and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)
            ):
                raise MetadataError(f"checksums[{file!r}] is not a sha256 hex digest")
        if not isinstance(self.signal_thresholds, dict):
            raise MetadataError("signal_thresholds must be a JSON object")
        _json_value(self.signal_thresholds, "signal_thresholds", 1)
        if self.signal_thresholds:
            buy = self.signal_thresholds.get("buy")
            sell = self.signal_thresholds.get("sell")
            numbers = all(
                isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1
                for v in (buy, sell)
            )
            if not (numbers and sell < buy):  # type: ignore[operator]
                raise MetadataError(
                    "signal_thresholds needs numbers 0 <= sell < buy <= 1, got "
                    f"buy={str(buy)[:20]} sell={str(sell)[:20]}"
                )
        if not isinstance(self.calibration, dict):
            raise MetadataError("calibration must be a JSON object")
        _json_value(self.calibration, "calibration", 1)
        try:
            check_calibration(self.calibration)
        except CalibrationError as exc:
            raise MetadataError(str(exc)) from None

    @property
    def native_file(self) -> str:
        """File name of the native model inside the model directory."""
        return NATIVE_FILES[self.model_type]

    def checksum_problem(
        self,
        model_dir: str | os.PathLike[str],
        max_bytes: int = MAX_MODEL_FILE_BYTES,
        digests: dict[str, str] | None = None,
    ) -> str | None:
        """What is wrong with the files :attr:`checksums` lists, or None when all match. Only
        regular files inside ``model_dir`` (the schema allows model file names only), never
        bigger than ``max_bytes``, are read.

        ``digests`` (file name to sha256) lets one load hash each file once: a file it names
        is taken to have that digest (the caller hashed the very bytes it uses, or hashed the
        file moments before in the same operation), and each file hashed here is added to it."""
        for name, expected in self.checksums.items():
            path = Path(model_dir) / name
            if digests is not None and name in digests:
                actual = digests[name]
            else:
                if not path.exists() and not path.is_symlink():
                    return f"{path} is missing"
                try:
                    actual = sha256_regular_file(path, max_bytes)
                except MetadataError as exc:
                    return str(exc)
                if digests is not None:
                    digests[name] = actual
            if actual != expected:
                return f"{path} is corrupt (sha256 {actual[:12]}, metadata says {expected[:12]})"
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelMetadata:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise MetadataError(f"unknown metadata keys: {', '.join(unknown)}")
        try:
            return cls(**raw)
        except TypeError as exc:  # a required key is missing
            raise MetadataError(str(exc)[:200]) from None

    @classmethod
    def read(cls, model_dir: str | os.PathLike[str]) -> ModelMetadata:
        path = Path(model_dir) / METADATA_FILE
        if not path.exists() and not path.is_symlink():
            raise MetadataError(f"metadata file {path} is missing")
        data = read_regular_file(path, MAX_SMALL_FILE_BYTES)
        try:
            raw = json.loads(data)
        except RecursionError:
            raise MetadataError(f"metadata file {path} is nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise MetadataError(f"metadata file {path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise MetadataError(f"metadata file {path} does not hold a JSON object")
        return cls.from_dict(raw)

    def write(self, model_dir: str | os.PathLike[str]) -> Path:
        """Write ``metadata.json`` atomically (temp file, fsync, rename)."""
        path = Path(model_dir) / METADATA_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


def _text(value: object, field: str, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise MetadataError(f"{field} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise MetadataError(f"{field} is empty")
    if len(value) > MAX_METADATA_TEXT:
        raise MetadataError(f"{field} is {len(value)} characters (max {MAX_METADATA_TEXT})")


def _integer(value: object, field: str, low: int, high: int = _MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise MetadataError(f"{field} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise MetadataError(f"{field} must lie in [{low}, {high}], got {value}")


def _number(value: object, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise MetadataError(f"{field} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise MetadataError(f"{field} must be finite, got {value}")


def _json_value(value: object, field: str, depth: int) -> None:
    """Plain JSON (objects with string keys, lists, strings, numbers, booleans, null), at most
    :data:`MAX_METADATA_DEPTH` deep."""
    if depth > MAX_METADATA_DEPTH:
        raise MetadataError(f"{field} is nested deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MetadataError(f"{field} has a key that is not a string")
            _json_value(item, field, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _json_value(item, field, depth + 1)
    elif value is not None and not isinstance(value, str | int | float | np.number | np.bool_):
        raise MetadataError(f"{field} holds a {type(value).__name__}, not a JSON value")


def _open_regular(path: Path) -> int:
    """A read-only descriptor of the regular file ``path``: never following a symbolic link
    and never blocking (a FIFO or device in its place is refused, not waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise MetadataError(f"{path} is a symbolic link; model files must be plain") from None
        raise MetadataError(f"{path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MetadataError(f"{path} is not a regular file")
    return fd


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`_open_regular`), at most
    ``max_bytes`` of them, or MetadataError.

    Read by the file's own size (one byte more tells a file that grew since it was measured;
    the rest is then read in 1 MiB blocks up to the limit): ``read(max_bytes + 1)`` allocated
    a buffer of the whole limit first (256 MiB for every model file, whatever its size)."""
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise MetadataError(f"{path} is {size} bytes, over the limit of {max_bytes}")
        data = fh.read(size + 1)
        if len(data) > size:  # it grew after the fstat
            blocks, total = [data], len(data)
            for block in iter(lambda: fh.read(1 << 20), b""):
                total += len(block)
                if total > max_bytes:
                    break
                blocks.append(block)
            if total > max_bytes:
                raise MetadataError(f"{path} is over the limit of {max_bytes} bytes")
            data = b"".join(blocks)
    if len(data) > max_bytes:
        raise MetadataError(f"{path} is over the limit of {max_bytes} bytes")
    return data


def sha256_regular_file(path: Path, max_bytes: int) -> str:
    """:func:`sha256_file` of a regular file of at most ``max_bytes`` (MetadataError else)."""
    fd = _open_regular(path)
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise MetadataError(f"{path} is {size} bytes, over the limit of {max_bytes}")
        read = 0
        for block in iter(lambda: fh.read(1 << 20), b""):
            read += len(block)
            if read > max_bytes:
                raise MetadataError(f"{path} is over the limit of {max_bytes} bytes")
            digest.update(block)
    return digest.hexdigest()


def check_model_dir(model_dir: Path, max_file_bytes: int = MAX_MODEL_FILE_BYTES) -> None:
    """A model directory from outside holds only model files (:data:`MODEL_FILES`), each a
    regular file (no link, FIFO, device or directory) of bounded size; MetadataError naming
    the first that is not. Names starting with "." are left alone (and never read)."""
    try:
        entries = sorted(os.scandir(model_dir), key=lambda e: e.name)
    except OSError as exc:
        raise MetadataError(f"{model_dir} cannot be listed: {exc.strerror}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.name not in MODEL_FILES:
            raise MetadataError(
                f"{model_dir} holds {entry.name[:64]!r}, not a model file "
                f"(allowed: {', '.join(sorted(MODEL_FILES))})"
            )
        if not entry.is_file(follow_symlinks=False):
            raise MetadataError(f"{model_dir}/{entry.name} is not a regular file")
        limit = (
            MAX_SMALL_FILE_BYTES
            if entry.name in (METADATA_FILE, FEATURE_IMPORTANCE_FILE)
            else max_file_bytes
        )
        size = entry.stat(follow_symlinks=False).st_size
        if size > limit:
            raise MetadataError(
                f"{model_dir}/{entry.name} is {size} bytes, over the limit of {limit}"
            )


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so a reader sees the old or the new file, never half."""
    atomic_write_bytes(path, text.encode())


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory by its path (opened read-only): a file written and closed
    by another writer (pyarrow's) before its rename, or a directory (:func:`fsync_dir`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so a rename or a new file in it survives a crash."""
    fsync_path(directory)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; servers may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` that replaces ``target`` on success.

    On any error the temporary directory is removed and ``target`` is left untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a server may run as another user
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_feature_importance(path: Path, importance: Mapping[str, float]) -> None:
    """CSV ``feature,gain,share`` sorted by gain, largest first."""
    total = sum(importance.values()) or 1.0
    rows = sorted(importance.items(), key=lambda kv: (-kv[1], kv[0]))
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["feature", "gain", "share"])
        for name, gain in rows:
            writer.writerow([name, f"{gain:.6g}", f"{gain / total:.6f}"])


@dataclass(frozen=True)
class HistoryFile:
    """One kline file a model was trained on (``metadata.data["files"]``), resolved."""

    written: str
    """The path as the metadata holds it."""
    path: Path
    """Where it is: the absolute path, or the first place a relative one exists (see
    :func:`history_files`); for a missing file, where it was looked for first."""
    sha256: str | None
    """The file's sha256 when training recorded it."""
    searched_from: Path | None = None
    """For a relative path: the model directory it was looked for from (and above)."""

    @property
    def exists(self) -> bool:
        return self.path.is_file()


def history_files(meta: ModelMetadata, model_dir: str | os.PathLike[str]) -> list[HistoryFile]:
    """The model's training files, resolved without depending on the working directory.

    Training writes absolute paths. A relative path (metadata written before that, relative to
    wherever training ran) is looked up beside the model directory and then in each directory
    above it, nearest first: a model at ``<root>/models/model_1`` (or kept at
    ``<root>/models/.versions/model_1/3``) trained from ``<root>`` on ``data/x.zip`` finds
    ``<root>/data/x.zip`` from any working directory.
    """
    base = Path(model_dir).resolve()
    resolved = []
    for entry in meta.data.get("files", []) if isinstance(meta.data, dict) else []:
        if not isinstance(entry, dict) or not entry.get("path"):
            continue
        written = str(entry["path"])
        path = Path(written)
        searched_from = None
        if not path.is_absolute():
            candidates = [directory / path for directory in (base, *base.parents)]
            path = next((c for c in candidates if c.is_file()), candidates[0])
            searched_from = base
        resolved.append(HistoryFile(written, path, entry.get("sha256"), searched_from))
    return resolved


def history_missing_message(missing: list[HistoryFile], listed: int) -> str:
    """One line naming the first missing history file (and how many more), bounded."""
    first = missing[0]
    where = str(first.path)
    if first.searched_from is not None:
        where = f"{first.written} (relative; not found from {first.searched_from} upwards)"
    more = f" and {len(missing) - 1} more of {listed}" if len(missing) > 1 else ""
    return (
        f"history file missing: {where[:400]}{more}; a full retrain needs all of the model's "
        "training data (restore it, or retrain incrementally)"
    )


# -- the parity reference kept with a model ------------------------------------------------------
#
# A server checks every model it loads: its own ONNX Runtime session runs the parity probe and
# must agree with the native model within PARITY_TOLERANCE. The native side (the probe rows,
# chosen from the ONNX model's own split thresholds, and the native model's P(up) on them)
# depends only on the native file, the ONNX file and the library versions, so it is computed once
# where the native model is in hand (training's :func:`training.trainers.write_model_dir`, or the
# server's short-lived reference child the first time) and kept as ``parity.npz``. A load that
# finds one bound to the files it is loading skips the child (a process start, the native
# library, onnx and the probe: ~0.6 s of CPU per hot swap) and still runs the check itself.
#
# The binding is everything the stored arrays depend on: the sha256 of the native and ONNX files,
# the native library's version, the converter and probe versions, the probe's shape; plus the
# sha256 of the arrays themselves. A reference whose binding is not the one expected is ignored
# and made again, never trusted. It is not in the metadata's checksums: it may be added after
# training (an old or imported model's first load), and it guards itself. A stored reference
# never makes a model pass that does not agree: its numbers are the native model's, and the
# check compares them with the serving session's answers at every load.

#: The Python distribution of each model type's native library.
NATIVE_LIBRARIES: dict[str, str] = {
    "lightgbm": "lightgbm",
    "xgboost": "xgboost",
    "catboost": "catboost",
}


@functools.cache
def native_library(model_type: str) -> str:
    """``"lightgbm 4.5.0"``: the installed native library a reference was computed with (read
    from the package metadata, never imported).

    Read once per process and model type: ``importlib.metadata.version`` walks ``sys.path``
    for the distribution at every call, and every load and hot swap asked. A library
    upgraded under a running server is seen at its restart (a reference bound to the old
    version is then made again, as for any binding that differs)."""
    package = NATIVE_LIBRARIES[model_type]
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package} (not installed)"


def parity_binding(
    meta: ModelMetadata, native_sha256: str, onnx_sha256: str, rows: int
) -> dict[str, Any]:
    """What a parity reference for these files must have been computed from."""
    return {
        "native_file": meta.native_file,
        "native_sha256": native_sha256,
        "onnx_sha256": onnx_sha256,
        "native_library": native_library(meta.model_type),
        "converter_version": CONVERTER_VERSION,
        "probe_version": PARITY_PROBE_VERSION,
        "rows": int(rows),
        "features": len(meta.feature_names),
    }


def _arrays_sha256(rows: np.ndarray, reference: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (rows, reference):
        digest.update(str(array.dtype).encode() + repr(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def write_parity_reference(
    model_dir: str | os.PathLike[str],
    binding: Mapping[str, Any],
    rows: np.ndarray,
    reference: np.ndarray,
) -> Path:
    """Write ``parity.npz`` (atomically): the probe ``rows`` (float32), the native model's
    P(up) on them (``reference``, float64) and the ``binding`` (:func:`parity_binding`) with
    the arrays' own sha256."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    reference = np.ascontiguousarray(reference, dtype=np.float64)
    stamped = {**binding, "arrays_sha256": _arrays_sha256(rows, reference)}
    buffer = io.BytesIO()
    np.savez(buffer, rows=rows, reference=reference, binding=np.array(json.dumps(stamped)))
    path = Path(model_dir) / PARITY_FILE
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_parity_reference(
    model_dir: str | os.PathLike[str],
    binding: Mapping[str, Any],
    max_bytes: int = MAX_MODEL_FILE_BYTES,
) -> tuple[np.ndarray, np.ndarray] | str:
    """The stored probe rows and native P(up) when ``parity.npz`` holds a reference with exactly
    this ``binding``; else why not (missing, unreadable, made for other files, altered), for the
    log. Never raises for a bad file: a reference that does not check out is made again."""
    path = Path(model_dir) / PARITY_FILE
    if not path.exists() and not path.is_symlink():
        return "none stored"
    try:
        data = read_regular_file(path, max_bytes)
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            rows = np.asarray(stored["rows"])
            reference = np.asarray(stored["reference"])
            found = json.loads(str(stored["binding"]))
    except MetadataError as exc:
        return str(exc)[:300]
    except Exception as exc:  # numpy's and zipfile's errors for a damaged file
        return f"{path} is unreadable ({type(exc).__name__})"
    if not isinstance(found, dict):
        return f"{path} holds no binding"
    claimed = found.pop("arrays_sha256", None)
    if found != dict(binding):
        differ = sorted(k for k in set(found) | set(binding) if found.get(k) != binding.get(k))
        return f"made for other files or libraries ({', '.join(differ)[:200]} differ)"
    if (
        rows.dtype != np.float32
        or reference.dtype != np.float64
        or rows.shape != (binding["rows"], binding["features"])
        or reference.shape != (binding["rows"],)
        or claimed != _arrays_sha256(rows, reference)
    ):
        return f"{path} was altered or damaged (its arrays do not match their sha256)"
    return rows, reference
