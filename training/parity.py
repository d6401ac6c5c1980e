"""The native side of the ONNX-vs-native parity check: its probe rows, and keeping it with a model.

Probe rows are built from the converted model's own split thresholds: every feature takes values
that sit exactly on one of its thresholds or one float32 step either side. That is where a
conversion that rounds a threshold the wrong way flips a split, so a few thousand such rows find
what millions of random rows might miss.

The native model's P(up) on those rows is the reference a server compares its own ONNX Runtime
session with. Training (:func:`training.trainers.write_model_dir`) and the server's reference
child (:mod:`xylen_server.serving.parity`) both compute it here and keep it in the model directory
(``parity.npz``, :data:`training.metadata.PARITY_FILE`), bound to the files it was computed from.

onnx is imported inside the functions: a serving process imports this module without it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.metadata import (
    ModelMetadata,
    model_input,
    parity_binding,
    sha256_file,
    write_parity_reference,
)

if TYPE_CHECKING:
    import onnx

_TREE_OPS = ("TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble")


def split_thresholds(model: onnx.ModelProto, n_features: int) -> list[np.ndarray]:
    """Distinct float32 split thresholds per feature, read from the model's tree operators."""
    import onnx  # only when a model is loaded, never on the request path
    from onnx import helper

    found: list[list[np.ndarray]] = [[] for _ in range(n_features)]
    for node in model.graph.node:
        if node.op_type not in _TREE_OPS:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        features = np.asarray(attrs.get("nodes_featureids", []), dtype=np.int64)
        if "nodes_values_as_tensor" in attrs:
            values = onnx.numpy_helper.to_array(attrs["nodes_values_as_tensor"])
        else:
            values = np.asarray(attrs.get("nodes_values", []), dtype=np.float32)
        modes = [m.decode() if isinstance(m, bytes) else m for m in attrs.get("nodes_modes", [])]
        branch = np.array([m != "LEAF" for m in modes], dtype=bool)
        if len(branch) != len(features):
            continue
        for j in range(n_features):
            found[j].append(values[branch & (features == j)].astype(np.float32))
    return [np.unique(np.concatenate(v)) if v else np.empty(0, np.float32) for v in found]


def probe_rows(model: onnx.ModelProto, n_features: int, n_rows: int, seed: int = 0) -> np.ndarray:
    """``n_rows`` rows whose values sit on, just below or just above split thresholds, in the
    engines' input convention (:func:`training.metadata.model_input`)."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    for j, thresholds in enumerate(split_thresholds(model, n_features)):
        if thresholds.size == 0:
            continue
        picked = thresholds[rng.integers(0, thresholds.size, n_rows)]
        step = rng.integers(-1, 2, n_rows)  # -1: just below, 0: on, +1: just above
        below = np.nextafter(picked, np.float32(-np.inf))
        above = np.nextafter(picked, np.float32(np.inf))
        rows[:, j] = np.where(step < 0, below, np.where(step > 0, above, picked))
    return model_input(rows)


def native_reference(
    meta: ModelMetadata,
    model: onnx.ModelProto,
    n_rows: int,
    predict_proba: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The probe rows of the ONNX ``model`` and ``predict_proba``'s P(up) on them (the native
    model's: float64, one per row)."""
    rows = probe_rows(model, len(meta.feature_names), n_rows)
    reference = np.asarray(predict_proba(rows), dtype=np.float64).reshape(len(rows))
    return rows, reference


def keep_reference(
    model_dir: Path,
    meta: ModelMetadata,
    native_sha256: str,
    onnx_bytes: bytes,
    rows: np.ndarray,
    reference: np.ndarray,
) -> Path | None:
    """Write ``parity.npz`` into ``model_dir`` for a reference computed from the native file
    whose sha256 was ``native_sha256`` when it was loaded and the ONNX model ``onnx_bytes``.
    Nothing is written (None) when the native file is not that one any more (replaced while the
    reference was computed): a reference is only ever bound to the files it came from."""
    if sha256_file(model_dir / meta.native_file) != native_sha256:
        return None
    binding = parity_binding(meta, native_sha256, hashlib.sha256(onnx_bytes).hexdigest(), len(rows))
    return write_parity_reference(model_dir, binding, rows, reference)
