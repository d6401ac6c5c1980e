"""The ONNX-vs-native check a model must pass before it serves.

Probe rows are built from the converted model's own split thresholds: every feature takes values
that sit exactly on one of its thresholds or one float32 step either side. That is where a
conversion that rounds a threshold the wrong way flips a split, so a few thousand such rows find
what millions of random rows might miss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from training.metadata import PARITY_TOLERANCE, model_input

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


def max_difference(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Largest absolute difference; infinite when either side is not finite."""
    if not (np.isfinite(reference).all() and np.isfinite(candidate).all()):
        return float("inf")
    return float(np.max(np.abs(reference - candidate))) if reference.size else 0.0


__all__ = ["PARITY_TOLERANCE", "max_difference", "probe_rows", "split_thresholds"]
