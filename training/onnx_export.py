"""Exact conversion of a trained model to ONNX, and the parity check that proves it.

ONNX's tree operators compare ``float32(x) <= float32(threshold)``. LightGBM keeps thresholds as
float64 and onnxmltools rounds them to the *nearest* float32; when that rounds up onto a value
that occurs in the data, the split flips for that value (seen: 1 row in 20,000 off by 0.01 on a
500-tree model). Models in xylen are defined on float32 features (training casts them, serving
casts them), so every input ``x`` is a float32 and ``x <= t`` holds exactly when
``x <= round_down_f32(t)``. We therefore round each numerical threshold *down* to float32 before
conversion; the converted model then agrees with the native one up to float32 accumulation of
leaf values (about 1e-7). XGBoost already stores float32 thresholds and CatBoost exports its own
ONNX, so only LightGBM needs the fix.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx

from training.metadata import CONVERTER_VERSION as CONVERTER_VERSION  # re-exported
from training.metadata import (
    INPUT_NAME,
    ONNX_FILE,
    PROBABILITIES_OUTPUT,
    ModelMetadata,
    atomic_write_bytes,
    sha256_file,
)

#: Metadata key in the ONNX file holding the sha256 of the native file it was converted from.
NATIVE_SHA256_KEY = "xylen.native_sha256"
#: The conversion's version (:data:`training.metadata.CONVERTER_VERSION`, bumped whenever the
#: conversion changes, so older .onnx files are reconverted) is kept in the file under this key.
CONVERTER_VERSION_KEY = "xylen.converter_version"
_ONNX_OPSET = 15


class ConversionError(RuntimeError):
    """The model could not be converted, or the converted model disagrees with the native one."""


def round_down_f32(values: np.ndarray) -> np.ndarray:
    """The largest float32 not above each float64 value (as float64)."""
    values = np.asarray(values, dtype=np.float64)
    f32 = values.astype(np.float32)
    above = f32.astype(np.float64) > values
    f32[above] = np.nextafter(f32[above], np.float32(-np.inf))
    return f32.astype(np.float64)


_THRESHOLD_LINE = re.compile(r"^threshold=(.*)$", re.MULTILINE)
_DECISION_LINE = re.compile(r"^decision_type=(.*)$", re.MULTILINE)
_TREE_SIZES_LINE = re.compile(r"^tree_sizes=.*\n", re.MULTILINE)


def lightgbm_model_with_f32_thresholds(model_text: str) -> str:
    """Rewrite every numerical split threshold of a LightGBM text model to round_down_f32."""
    out: list[str] = []
    for block in re.split(r"(?m)^(?=Tree=)", model_text):
        thresholds = _THRESHOLD_LINE.search(block)
        decisions = _DECISION_LINE.search(block)
        if not block.startswith("Tree=") or thresholds is None or decisions is None:
            out.append(block)
            continue
        values = np.array([float(v) for v in thresholds.group(1).split()])
        kinds = np.array([int(v) for v in decisions.group(1).split()])
        numerical = (kinds & 1) == 0  # bit 0 marks a categorical split
        values[numerical] = round_down_f32(values[numerical])
        line = "threshold=" + " ".join(repr(float(v)) for v in values)
        out.append(block[: thresholds.start()] + line + block[thresholds.end() :])
    # The header's tree_sizes lists each tree's byte length, which the rewrite changes; without
    # it LightGBM parses the trees sequentially.
    return _TREE_SIZES_LINE.sub("", "".join(out), count=1)


def _convert_lightgbm(native: Path, n_features: int) -> onnx.ModelProto:
    import lightgbm as lgb
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    booster = lgb.Booster(model_str=lightgbm_model_with_f32_thresholds(native.read_text()))
    return convert_lightgbm(
        booster,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        zipmap=False,
        target_opset=_ONNX_OPSET,
    )


def _convert_xgboost(native: Path, n_features: int) -> onnx.ModelProto:
    import xgboost as xgb
    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    classifier = xgb.XGBClassifier()
    classifier.load_model(str(native))
    # onnxmltools reads split features as "f<index>"; a model trained on named columns is fine too.
    classifier.get_booster().feature_names = None
    return convert_xgboost(
        classifier,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        target_opset=_ONNX_OPSET,
    )


def _convert_catboost(native: Path, n_features: int) -> onnx.ModelProto:
    from catboost import CatBoostClassifier

    model = CatBoostClassifier()
    model.load_model(str(native))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        model.save_model(str(path), format="onnx")
        converted = onnx.load(str(path))
    # CatBoost names its input "features"; give every model the same input name.
    old = converted.graph.input[0].name
    converted.graph.input[0].name = INPUT_NAME
    for node in converted.graph.node:
        node.input[:] = [INPUT_NAME if name == old else name for name in node.input]
    _drop_zipmap(converted)
    return converted


def _drop_zipmap(model: onnx.ModelProto) -> None:
    """Replace a ZipMap (a list of {class: probability} maps) by the plain (N, 2) float tensor
    it was fed, under the same output name."""
    graph = model.graph
    for node in list(graph.node):
        if node.op_type != "ZipMap":
            continue
        source, target = node.input[0], node.output[0]
        graph.node.remove(node)
        for other in graph.node:
            other.output[:] = [target if name == source else name for name in other.output]
        for i, output in enumerate(graph.output):
            if output.name == target:
                graph.output.remove(output)
                graph.output.insert(
                    i, onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, ["N", 2])
                )


_CONVERTERS = {
    "lightgbm": _convert_lightgbm,
    "xgboost": _convert_xgboost,
    "catboost": _convert_catboost,
}


def _make_batch_dims_dynamic(model: onnx.ModelProto) -> None:
    """Give every graph output a symbolic batch dimension (onnxmltools writes a fixed 1 for the
    label, which makes onnxruntime warn on every batch)."""
    for output in model.graph.output:
        if not output.type.HasField("tensor_type"):
            continue
        dims = output.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"


def convert(meta: ModelMetadata, model_dir: Path) -> onnx.ModelProto:
    """Convert the native model in ``model_dir`` to an in-memory ONNX model."""
    native = model_dir / meta.native_file
    try:
        model = _CONVERTERS[meta.model_type](native, len(meta.feature_names))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConversionError(f"cannot convert {native} to ONNX: {exc}") from exc
    _make_batch_dims_dynamic(model)
    outputs = [o.name for o in model.graph.output]
    if PROBABILITIES_OUTPUT not in outputs:
        raise ConversionError(
            f"converted {native} has outputs {outputs}, no {PROBABILITIES_OUTPUT}"
        )
    onnx.helper.set_model_props(
        model,
        {
            NATIVE_SHA256_KEY: sha256_file(native),
            CONVERTER_VERSION_KEY: CONVERTER_VERSION,
            "xylen.model_name": meta.name,
            "xylen.model_version": str(meta.version),
        },
    )
    return model


def onnx_is_current(model_dir: Path, meta: ModelMetadata) -> bool:
    """True when ``model.onnx`` exists and was converted from the native file as it is now."""
    path = model_dir / ONNX_FILE
    if not path.exists():
        return False
    try:
        props = {
            p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
        }
    except Exception:  # a corrupt file is not current; it gets reconverted
        return False
    return props.get(CONVERTER_VERSION_KEY) == CONVERTER_VERSION and props.get(
        NATIVE_SHA256_KEY
    ) == sha256_file(model_dir / meta.native_file)


def export_onnx(model_dir: str | os.PathLike[str]) -> Path:
    """Convert the model in ``model_dir`` and write ``model.onnx`` beside it, atomically."""
    model_dir = Path(model_dir)
    meta = ModelMetadata.read(model_dir)
    model = convert(meta, model_dir)
    path = model_dir / ONNX_FILE
    atomic_write_bytes(path, model.SerializeToString())
    return path
