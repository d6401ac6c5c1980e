"""Fuzzing the Open Inference Protocol of a live server process: random tensors (datatypes,
shapes, contents, raw bytes, names, versions, requested outputs) must each get a proper status,
never UNKNOWN or INTERNAL, and the server must still answer a fixed request identically."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import ServerProcess, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xylen.inference import grpc_predict_v2_pb2 as v2
from xylen.inference import grpc_predict_v2_pb2_grpc as v2_grpc

IMPROPER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def fuzzed(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("fuzz-v2")
    server = start_server(
        models_root,
        env={"FEEDBACK_DATA_DIR": str(data), "RETRAIN_AUTO": "false", "LOG_LEVEL": "WARNING"},
        log_dir=data,
    )
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def v2_stub(fuzzed: ServerProcess) -> Iterator[v2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(fuzzed.address) as channel:
        yield v2_grpc.GRPCInferenceServiceStub(channel)


def _fixed(rows: np.ndarray) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="model_1")
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request


@pytest.fixture(scope="module")
def baseline(v2_stub, feature_rows) -> tuple[np.ndarray, bytes]:
    rows = np.ascontiguousarray(feature_rows[:8], dtype=np.float32)
    return rows, v2_stub.ModelInfer(_fixed(rows)).raw_output_contents[0]


names = st.one_of(st.sampled_from(["", "model_1", "model_9", "features"]), st.text(max_size=300))
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def infer_requests(draw: st.DrawFn) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(
        model_name=draw(names),
        model_version=draw(st.one_of(st.sampled_from(["", "1", "2"]), st.text(max_size=80))),
        id=draw(st.text(max_size=200)),
    )
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["features", "input-0", ""])),
            datatype=draw(st.sampled_from(["FP32", "FP64", "INT32", "BYTES", "fp32", ""])),
            shape=draw(
                st.lists(
                    st.one_of(
                        st.integers(-3, 30), st.sampled_from([25, 4097, 2**40, -(2**63), 2**63 - 1])
                    ),
                    max_size=4,
                )
            ),
        )
        kind = draw(st.sampled_from(["fp32", "fp64", "int", "bytes", "none"]))
        if kind == "fp32":
            tensor.contents.fp32_contents.extend(draw(st.lists(floats, max_size=80)))
        elif kind == "fp64":
            tensor.contents.fp64_contents.extend(draw(st.lists(st.floats(), max_size=30)))
        elif kind == "int":
            tensor.contents.int_contents.extend(draw(st.lists(st.integers(-5, 5), max_size=30)))
        elif kind == "bytes":
            tensor.contents.bytes_contents.append(draw(st.binary(max_size=40)))
    for _ in range(draw(st.integers(0, 2))):
        request.raw_input_contents.append(draw(st.binary(max_size=300)))
    for _ in range(draw(st.integers(0, 2))):
        request.outputs.add(
            name=draw(st.sampled_from(["probability_up", "signal", "prediction_id", "x"]))
        )
    return request


def _infer(stub: v2_grpc.GRPCInferenceServiceStub, request: v2.ModelInferRequest) -> bool:
    """One fuzzed ModelInfer: answered, or refused with a proper status (True if refused)."""
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() not in IMPROPER, (error.code(), error.details())
        assert len(error.details() or "") < 400
        return True
    return False


def _ready_and_metadata(stub: v2_grpc.GRPCInferenceServiceStub, name: str, version: str) -> None:
    for call, request in (
        (stub.ModelReady, v2.ModelReadyRequest(name=name, version=version)),
        (stub.ModelMetadata, v2.ModelMetadataRequest(name=name, version=version)),
    ):
        try:
            call(request, timeout=30)
        except grpc.RpcError as error:
            assert error.code() not in IMPROPER, (error.code(), error.details())


@FUZZ
@given(request=infer_requests())
def test_fuzz_model_infer(v2_stub, baseline, request):
    _infer(v2_stub, request)


@FUZZ
@given(name=names, version=st.text(max_size=300))
def test_fuzz_model_ready_and_metadata(v2_stub, baseline, name, version):
    _ready_and_metadata(v2_stub, name, version)


def test_after_the_fuzzing_the_same_answer(v2_stub, baseline):
    """The server still answers the fixed request bit for bit after fuzzing of its own (run
    first or alone, this test fuzzed nothing before: it passed without testing anything)."""
    refused = []

    @settings(FUZZ, max_examples=100)
    @given(request=infer_requests(), name=names, version=st.text(max_size=300))
    def fuzz(request, name, version):
        refused.append(_infer(v2_stub, request))
        _ready_and_metadata(v2_stub, name, version)

    fuzz()
    assert len(refused) >= 50 and any(refused)  # the fuzzing ran and reached the server
    rows, before = baseline
    assert v2_stub.ModelInfer(_fixed(rows)).raw_output_contents[0] == before
    assert v2_stub.ServerReady(v2.ServerReadyRequest()).ready
