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


# -- the native reference, computed in a short-lived child process ------------------------------
#
# The serving process never imports a native booster library (or onnx and its converters) when
# it serves ONNX: those take 60-150 MB it would keep for good (LightGBM brings scipy and pandas,
# XGBoost scikit-learn, CatBoost polars), and converting and building the probe is seconds of
# Python that would hold the GIL beside the event loop during a hot swap. A child process loads
# the native model, converts it to ONNX when no current ``model.onnx`` is there, builds the
# probe rows and the native booster's probabilities on them, writes them to a file and exits;
# the server runs the same rows through its own sessions and compares. It is started through
# :mod:`xylen_server.serving.reference`, which lowers its priority before any of this runs.


def _hide_optional_imports(model_type: str, converting: bool) -> None:
    """Keep the child small (it runs beside the server, within the same container limit): the
    libraries import scikit-learn, pandas and polars when they are installed, for features
    neither the booster's predict nor its conversion needs. Measured peak RSS of the child:
    LightGBM 173 -> 102 MiB, XGBoost 265 -> 124 MiB with a current model.onnx (its converter
    needs scikit-learn). CatBoost reads ``sys.modules`` itself, so nothing is hidden there."""
    import sys

    hidden = {
        "lightgbm": ("sklearn", "pandas", "polars"),
        "xgboost": ("pandas", "polars") if converting else ("sklearn", "pandas", "polars"),
    }.get(model_type, ())
    for name in hidden:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # import name -> ImportError


def reference_main(argv: list[str]) -> int:
    """``MODEL_DIR OUT.npz ROWS``: see above. The file also says the niceness it ran at."""
    import io
    import logging
    import os
    import sys
    from pathlib import Path

    from training.metadata import ONNX_FILE, ModelMetadata
    from xylen_server.errors import ModelLoadError

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    model_dir, out, n_rows = Path(argv[0]), Path(argv[1]), int(argv[2])
    try:
        meta = ModelMetadata.read(model_dir)
        native_path = model_dir / meta.native_file
        from training.onnx_export import onnx_is_current

        _hide_optional_imports(meta.model_type, converting=not onnx_is_current(model_dir, meta))
        from xylen_server.serving.native import NativeModel

        try:
            native = NativeModel(meta, model_dir, 1)
        except Exception as exc:  # every library has its own error for a corrupt file
            raise ModelLoadError(f"model {meta.name!r}: cannot load {native_path}: {exc}") from exc
        import onnx

        from training.onnx_export import ConversionError, convert, export_onnx

        in_memory = b""
        try:
            if not onnx_is_current(model_dir, meta):
                try:
                    export_onnx(model_dir)
                except PermissionError:
                    model = convert(meta, model_dir)
                    in_memory = model.SerializeToString()
            if not in_memory:
                model = onnx.load_from_string((model_dir / ONNX_FILE).read_bytes())
        except ConversionError as exc:
            raise ModelLoadError(f"model {meta.name!r}: {exc}") from exc
        except Exception as exc:  # a corrupt ONNX file
            raise ModelLoadError(f"model {meta.name!r}: cannot load ONNX model: {exc}") from exc
        rows = probe_rows(model, len(meta.feature_names), n_rows)
        reference = native.predict_proba(rows)
        native.close()
        buffer = io.BytesIO()
        np.savez(
            buffer,
            rows=rows,
            reference=reference,
            onnx=np.frombuffer(in_memory, dtype=np.uint8),
            niceness=np.int64(os.getpriority(os.PRIO_PROCESS, 0)),
        )
        out.write_bytes(buffer.getvalue())
    except ModelLoadError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(reference_main(sys.argv[1:]))
