"""The ONNX-vs-native check a model must pass before it serves.

The probe rows and the stored reference are training's (:mod:`training.parity`): probe rows sit
on, just below or just above the converted model's own split thresholds, where a conversion that
rounds a threshold the wrong way flips a split.
"""

from __future__ import annotations

import numpy as np

from training.metadata import PARITY_TOLERANCE
from training.parity import probe_rows, split_thresholds


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
    """``MODEL_DIR OUT.npz ROWS``: see above. The file also says the niceness it ran at. The
    reference is also kept in the model directory (``parity.npz``, :mod:`training.parity`), so
    the next load of these files (a rollback to this version, a reload, another worker) starts
    no child; a read-only directory just keeps none."""
    import io
    import logging
    import os
    import sys
    from pathlib import Path

    from training.metadata import ONNX_FILE, ModelMetadata, sha256_file
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
            native_sha256 = sha256_file(native_path)
            native = NativeModel(meta, model_dir, 1)
        except Exception as exc:  # every library has its own error for a corrupt file
            raise ModelLoadError(f"model {meta.name!r}: cannot load {native_path}: {exc}") from exc
        import onnx

        from training.onnx_export import ConversionError, convert, export_onnx
        from training.parity import keep_reference, native_reference

        in_memory = b""
        try:
            if not onnx_is_current(model_dir, meta):
                try:
                    export_onnx(model_dir)
                except PermissionError:
                    in_memory = convert(meta, model_dir).SerializeToString()
            onnx_bytes = in_memory or (model_dir / ONNX_FILE).read_bytes()
            model = onnx.load_from_string(onnx_bytes)
        except ConversionError as exc:
            raise ModelLoadError(f"model {meta.name!r}: {exc}") from exc
        except Exception as exc:  # a corrupt ONNX file
            raise ModelLoadError(f"model {meta.name!r}: cannot load ONNX model: {exc}") from exc
        rows, reference = native_reference(meta, model, n_rows, native.predict_proba)
        native.close()
        if not in_memory:
            try:
                keep_reference(model_dir, meta, native_sha256, onnx_bytes, rows, reference)
            except OSError as exc:  # a read-only or full disk: the next load makes it again
                print(f"parity reference not kept in {model_dir}: {exc}", file=sys.stderr)
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
