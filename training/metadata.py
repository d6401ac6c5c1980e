"""Model metadata: the one description of a trained model, written by training, read by serving.

It also fixes how every engine is fed (:func:`model_input`, the graph's input and output
names), so training, conversion and serving agree without importing each other.

A model directory (``models/<name>/``) holds the native model file of its type, optionally a
``model.onnx`` converted from it, ``feature_importance.csv`` and ``metadata.json`` (this class).
The server refuses a model whose ``feature_names``, ``lookback`` or ``features_hash`` disagree with
the feature code it runs (see :mod:`training.features`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METADATA_FILE = "metadata.json"
ONNX_FILE = "model.onnx"
FEATURE_IMPORTANCE_FILE = "feature_importance.csv"

#: Native model file name per model type (``lightgbm_model.txt``: the name operators' LightGBM
#: tooling already writes).
NATIVE_FILES: dict[str, str] = {
    "lightgbm": "lightgbm_model.txt",
    "xgboost": "xgboost_model.json",
    "catboost": "catboost_model.cbm",
}
MODEL_TYPES = tuple(NATIVE_FILES)

#: Name of the ONNX graph's input: float32 ``[batch, features]`` (batch dimension dynamic).
INPUT_NAME = "input"
#: Name of the ONNX graph's output: float32 ``[batch, 2]``, P(down) and P(up).
PROBABILITIES_OUTPUT = "probabilities"
#: Largest allowed |onnx - native| difference in P(up) on the parity probe.
PARITY_TOLERANCE = 1e-5
#: LightGBM reads any |x| <= 1e-35 as 0 (its kZeroThreshold) and places splits at +-1e-35
#: between 0 and the nearest values; ONNX compares such values as they are.
ZERO_THRESHOLD = 1e-35


def model_input(rows: np.ndarray) -> np.ndarray:
    """The one input convention every engine sees: float32, with LightGBM's zero snapping
    applied, so ONNX and native engines branch the same way on every value."""
    out = np.asarray(rows, dtype=np.float32).copy()
    out[np.abs(out) <= ZERO_THRESHOLD] = 0.0
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

    def __post_init__(self) -> None:
        if self.model_type not in NATIVE_FILES:
            raise MetadataError(
                f"model_type {self.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
            )
        if self.version < 1:
            raise MetadataError(f"version must be >= 1, got {self.version}")
        if not self.feature_names:
            raise MetadataError("feature_names is empty")
        if self.lookback < 1:
            raise MetadataError(f"lookback must be >= 1, got {self.lookback}")
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

    @property
    def native_file(self) -> str:
        """File name of the native model inside the model directory."""
        return NATIVE_FILES[self.model_type]

    def checksum_problem(self, model_dir: str | os.PathLike[str]) -> str | None:
        """What is wrong with the files :attr:`checksums` lists, or None when all match."""
        for name, expected in self.checksums.items():
            path = Path(model_dir) / name
            if not path.is_file():
                return f"{path} is missing"
            actual = sha256_file(path)
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
            raise MetadataError(str(exc)) from exc

    @classmethod
    def read(cls, model_dir: str | os.PathLike[str]) -> ModelMetadata:
        path = Path(model_dir) / METADATA_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise MetadataError(f"metadata file {path} is missing") from exc
        except (OSError, ValueError) as exc:
            raise MetadataError(f"metadata file {path} is unreadable: {exc}") from exc
        if not isinstance(raw, dict):
            raise MetadataError(f"metadata file {path} does not hold a JSON object")
        return cls.from_dict(raw)

    def write(self, model_dir: str | os.PathLike[str]) -> Path:
        """Write ``metadata.json`` atomically (temp file, fsync, rename)."""
        path = Path(model_dir) / METADATA_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


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


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so a rename or a new file in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
