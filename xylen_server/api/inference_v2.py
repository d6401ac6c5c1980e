"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``.

Served beside ``xylen.v1.ModelService`` on the same port, by the same interceptors (metrics,
errors to status + ErrorInfo, credentials, admission) and from the same :class:`Predictor`: a
ModelInfer is turned into the Predict request it means and answered by the same call, so the
same limits, the same validation, the same session pool, the same calibration and thresholds,
the same prediction log (Feedback finds its ids) apply, and the probabilities are Predict's,
bit for bit. Then Triton's ``tritonclient``, KServe (as a custom runtime), MLServer clients and
``perf_analyzer``-style tools work unchanged.

The model as the protocol sees it (``ModelMetadata``):

- one input ``features``, ``FP32``, shape ``[batch, n_features]`` in ``GetModelInfo``'s
  ``feature_names`` order, sent as ``contents.fp32_contents`` or as one
  ``raw_input_contents`` entry (little-endian float32, row-major);
- outputs ``probability_up`` (``FP64`` ``[batch]``, the calibrated P(up): Predict's
  ``probability_up``, a double, bit for bit), ``signal`` (``INT32`` ``[batch]``, the
  ``xylen.v1.Signal`` number: 1 BUY, 2 SELL, 3 HOLD) and ``prediction_id`` (``BYTES``
  ``[batch]``, the id Feedback takes);
  ``outputs`` in the request picks some of them. The answer uses the request's form: raw in,
  ``raw_output_contents`` out; ``contents`` in, ``contents`` out;
- ``model_version`` is the served version as a decimal string; a request naming another
  version (or another model) is NOT_FOUND. An empty model name means the served model, as in
  xylen.v1.

ServerLive is true while the process answers; ServerReady and ModelReady are true once the
model is loaded, checked and warmed (and not while shutting down); ModelReady of a model or
version this server does not serve is false.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import grpc
import numpy as np

from xylen.inference import grpc_predict_v2_pb2 as v2
from xylen.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.api import limits
from xylen_server.errors import (
    InterceptedRegistration,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    shown,
)
from xylen_server.serving.model_store import LoadedModel
from xylen_server.serving.predictor import Predictor, Result, check_model_name

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
INPUT_NAME = "features"
OUTPUTS = {"probability_up": "FP64", "signal": "INT32", "prediction_id": "BYTES"}
SERVER_NAME = "xylen"
SERVER_VERSION = "0.1.0"
_F32 = np.dtype("<f4")


class InferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol over the server's :class:`Predictor` (module docstring)."""

    def __init__(self, predictor: Predictor, serving: Callable[[], bool]) -> None:
        self.predictor = predictor
        self.settings = predictor.settings
        self._serving = serving
        """Whether health reports SERVING (false while loading and once SIGTERM arrived)."""

    def _ready(self) -> bool:
        return self.predictor.ready and self._serving()

    async def ServerLive(
        self, request: v2.ServerLiveRequest, context: Context
    ) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: v2.ServerReadyRequest, context: Context
    ) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self._ready())

    async def ServerMetadata(
        self, request: v2.ServerMetadataRequest, context: Context
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    async def ModelReady(
        self, request: v2.ModelReadyRequest, context: Context
    ) -> v2.ModelReadyResponse:
        limits.check_name(request.name, self.settings, "name")
        if not self._ready():
            return v2.ModelReadyResponse(ready=False)
        meta = self.predictor.model.meta
        named = not request.name or request.name == meta.name
        versioned = not request.version or request.version == str(meta.version)
        return v2.ModelReadyResponse(ready=named and versioned)

    async def ModelMetadata(
        self, request: v2.ModelMetadataRequest, context: Context
    ) -> v2.ModelMetadataResponse:
        model = self._model(request.name, request.version, "name")
        meta = model.meta
        tensor = v2.ModelMetadataResponse.TensorMetadata
        return v2.ModelMetadataResponse(
            name=meta.name,
            versions=[str(meta.version)],
            platform=_platform(model),
            inputs=[tensor(name=INPUT_NAME, datatype="FP32", shape=[-1, len(meta.feature_names)])],
            outputs=[
                tensor(name=name, datatype=kind, shape=[-1]) for name, kind in OUTPUTS.items()
            ],
        )

    async def ModelInfer(
        self, request: v2.ModelInferRequest, context: Context
    ) -> v2.ModelInferResponse:
        limits.check_text(
            request.id,
            self.settings.max_request_id_bytes,
            "id",
            "MAX_REQUEST_ID_BYTES",
            "REQUEST_ID_TOO_LONG",
        )
        model = self._model(request.model_name, request.model_version, "model_name")
        wanted = _requested_outputs(request.outputs)
        rows = self._rows(request, len(model.meta.feature_names))
        predict = pb.PredictRequest(
            model_name=model.meta.name,
            inputs=[
                pb.PredictInput(features=types_pb2.FeatureVector(values=row))
                for row in rows.tolist()
            ],
        )
        deadline = context.time_remaining()
        result = await self.predictor.predict(
            predict, deadline=None if deadline is None else time.monotonic() + deadline
        )
        return _response(request, result, wanted, raw=bool(request.raw_input_contents))

    # -- checks ---------------------------------------------------------------------------------

    def _model(self, name: str, version: str, field: str) -> LoadedModel:
        """The served model, NOT_FOUND when ``name`` or ``version`` (non-empty) names another."""
        limits.check_name(name, self.settings, field)
        model = self.predictor.model
        check_model_name(name, model.meta.name)
        if version and version != str(model.meta.version):
            raise NotFound(
                f"model {model.meta.name!r} version {shown(version)} is not served here; "
                f"this server serves version {model.meta.version}",
                reason="MODEL_VERSION_NOT_FOUND",
                model_version=version[:64],
                serving=model.meta.version,
            )
        return model

    def _rows(self, request: v2.ModelInferRequest, n_features: int) -> np.ndarray:
        """The one FP32 ``[batch, n_features]`` input as a float32 matrix, or the refusal that
        names what is wrong with it (values are checked by the Predict path it goes on to)."""
        if len(request.inputs) != 1:
            raise InvalidArgument(
                f"the request has {len(request.inputs)} input tensors; the model takes one, "
                f"{INPUT_NAME!r} (FP32 [batch, {n_features}])",
                reason="WRONG_INPUT_COUNT",
                expected=1,
                got=len(request.inputs),
            )
        tensor = request.inputs[0]
        if tensor.name != INPUT_NAME:
            raise InvalidArgument(
                f"input {shown(tensor.name)} is not an input of this model; "
                f"it takes {INPUT_NAME!r} (FP32 [batch, {n_features}])",
                reason="UNKNOWN_INPUT",
                expected=INPUT_NAME,
            )
        if tensor.datatype != "FP32":
            raise InvalidArgument(
                f"input {INPUT_NAME!r} has datatype {shown(tensor.datatype)}; the model takes FP32",
                reason="WRONG_DATATYPE",
                expected="FP32",
                got=tensor.datatype[:64],
            )
        shape = list(tensor.shape)
        if len(shape) != 2 or any(d < 0 for d in shape):
            raise InvalidArgument(
                f"input {INPUT_NAME!r} has shape {shape[:8]}; "
                f"the model takes [batch, {n_features}]",
                reason="WRONG_SHAPE",
                expected=f"[batch, {n_features}]",
            )
        batch, width = shape
        if width != n_features:
            raise InvalidArgument(
                f"input {INPUT_NAME!r} has {width} features per row, the model takes {n_features}",
                reason="FEATURE_COUNT_MISMATCH",
                expected=n_features,
                got=width,
            )
        if batch == 0:
            raise InvalidArgument(
                "the request has no rows; send at least one", reason="EMPTY_BATCH"
            )
        limit = self.settings.max_batch_rows
        if batch > limit:
            raise ResourceExhausted(
                f"the request has {batch} rows, more than MAX_BATCH_ROWS ({limit})",
                reason="BATCH_TOO_LARGE",
                rows=batch,
                limit=limit,
            )
        return _values(request, tensor, batch, n_features)


def _values(
    request: v2.ModelInferRequest,
    tensor: v2.ModelInferRequest.InferInputTensor,
    batch: int,
    n_features: int,
) -> np.ndarray:
    count = batch * n_features
    contents = tensor.contents
    others = [field.name for field, _ in contents.ListFields() if field.name != "fp32_contents"]
    if others:
        raise InvalidArgument(
            f"input {INPUT_NAME!r} is FP32 but carries {others[0]}; send fp32_contents or "
            "raw_input_contents",
            reason="WRONG_DATATYPE",
            expected="FP32",
            got=others[0],
        )
    if request.raw_input_contents:
        if contents.fp32_contents:
            raise InvalidArgument(
                "the request has both raw_input_contents and contents; send one of them",
                reason="AMBIGUOUS_CONTENTS",
            )
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(
                f"the request has {len(request.raw_input_contents)} raw_input_contents for "
                "one input tensor",
                reason="WRONG_INPUT_COUNT",
                expected=1,
                got=len(request.raw_input_contents),
            )
        raw = request.raw_input_contents[0]
        if len(raw) != count * _F32.itemsize:
            raise InvalidArgument(
                f"raw_input_contents holds {len(raw)} bytes; shape [{batch}, {n_features}] "
                f"FP32 needs {count * _F32.itemsize}",
                reason="WRONG_CONTENT_SIZE",
                expected=count * _F32.itemsize,
                got=len(raw),
            )
        return np.frombuffer(raw, dtype=_F32).reshape(batch, n_features)
    values = contents.fp32_contents
    if not values:
        raise InvalidArgument(
            f"input {INPUT_NAME!r} has no data: send contents.fp32_contents or raw_input_contents",
            reason="MISSING_INPUT",
        )
    if len(values) != count:
        raise InvalidArgument(
            f"input {INPUT_NAME!r} has {len(values)} values; shape [{batch}, {n_features}] "
            f"needs {count}",
            reason="WRONG_CONTENT_SIZE",
            expected=count,
            got=len(values),
        )
    return np.asarray(values, dtype=np.float32).reshape(batch, n_features)


def _requested_outputs(
    outputs: Sequence[v2.ModelInferRequest.InferRequestedOutputTensor],
) -> list[str]:
    """The outputs to send, in the order asked (none asked: all of them), each at most once: a
    name repeated would add a whole tensor to the answer each time, so that a small request
    asked for an answer hundreds of times its size, built on the event loop."""
    if not outputs:
        return list(OUTPUTS)
    names: list[str] = []
    for output in outputs:
        if output.name not in OUTPUTS:
            raise InvalidArgument(
                f"output {shown(output.name)} is not an output of this model; it has "
                f"{', '.join(OUTPUTS)}",
                reason="UNKNOWN_OUTPUT",
            )
        if output.name in names:
            raise InvalidArgument(
                f"output {output.name} is asked for more than once", reason="DUPLICATE_OUTPUT"
            )
        names.append(output.name)
    return names


def _response(
    request: v2.ModelInferRequest, result: Result, wanted: list[str], raw: bool
) -> v2.ModelInferResponse:
    meta = result.model.meta
    batch = len(result.prediction_ids)
    response = v2.ModelInferResponse(
        model_name=meta.name, model_version=str(meta.version), id=request.id
    )
    arrays: dict[str, Any] = {
        "probability_up": np.asarray(result.probabilities, dtype="<f8"),
        "signal": np.asarray(result.signals, dtype="<i4"),
        "prediction_id": [i.encode() for i in result.prediction_ids],
    }
    for name in wanted:
        output = response.outputs.add(name=name, datatype=OUTPUTS[name], shape=[batch])
        data = arrays[name]
        if raw:
            response.raw_output_contents.append(
                b"".join(struct.pack("<I", len(b)) + b for b in data)
                if name == "prediction_id"
                else data.tobytes()
            )
        elif name == "probability_up":
            output.contents.fp64_contents.extend(data.tolist())
        elif name == "signal":
            output.contents.int_contents.extend(data.tolist())
        else:
            output.contents.bytes_contents.extend(data)
    return response


def _platform(model: LoadedModel) -> str:
    if model.engine.engine == "onnx":
        return "onnxruntime_onnx"
    return f"{model.meta.model_type}_native"


def add_to_server(
    server: grpc.aio.Server | InterceptedRegistration,
    predictor: Predictor,
    serving: Callable[[], bool],
) -> None:
    """Serve ``inference.GRPCInferenceService`` on ``server`` beside xylen.v1."""
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(predictor, serving), server
    )
