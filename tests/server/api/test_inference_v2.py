"""The Open Inference Protocol (KServe v2) beside xylen.v1 on the same port of a real server:
its answers equal Predict's for the same rows, bad tensors get statuses that name the problem,
the same credentials, admission and metrics apply, and Triton's own client (a real
``tritonclient`` process) and grpcurl (reflection) work against it unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import harness
import numpy as np
import pytest
from errorinfo import error_info

from xylen.inference import grpc_predict_v2_pb2 as v2
from xylen.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
N_FEATURES = 25
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def v2_stub(channel: grpc.Channel) -> v2_grpc.GRPCInferenceServiceStub:
    return v2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def rows(feature_rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(feature_rows[:64], dtype=np.float32)


def infer_request(rows: np.ndarray, raw: bool = False, **fields: object) -> v2.ModelInferRequest:
    tensor = v2.ModelInferRequest.InferInputTensor(
        name="features", datatype="FP32", shape=list(rows.shape)
    )
    request = v2.ModelInferRequest(inputs=[tensor], **{"model_name": "model_1", **fields})  # type: ignore[arg-type]
    if raw:
        request.raw_input_contents.append(rows.astype("<f4").tobytes())
    else:
        tensor = request.inputs[0]
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    return request


def predict(stub: pb_grpc.ModelServiceStub, rows: np.ndarray) -> pb.PredictResponse:
    return stub.Predict(pb.PredictRequest(inputs=[harness.feature_input(r) for r in rows]))


def output(response: v2.ModelInferResponse, name: str) -> v2.ModelInferResponse.InferOutputTensor:
    return next(o for o in response.outputs if o.name == name)


def test_model_infer_equals_predict(stub, v2_stub, rows):
    expected = predict(stub, rows).predictions
    response = v2_stub.ModelInfer(infer_request(rows, id="req-1"))
    assert response.model_name == "model_1" and response.model_version == "1"
    assert response.id == "req-1"
    probability = output(response, "probability_up")
    assert probability.datatype == "FP64" and list(probability.shape) == [len(rows)]
    got = np.array(probability.contents.fp64_contents)
    want = np.array([p.probability_up for p in expected])
    assert np.array_equal(got, want), np.max(np.abs(got - want))  # bit for bit, not close
    signal = output(response, "signal")
    assert list(signal.contents.int_contents) == [int(p.signal) for p in expected]
    ids = [b.decode() for b in output(response, "prediction_id").contents.bytes_contents]
    assert len(set(ids)) == len(rows) and not set(ids) & {p.prediction_id for p in expected}


def test_raw_input_contents_answer_in_raw_outputs(stub, v2_stub, rows):
    want = np.array([p.probability_up for p in predict(stub, rows).predictions])
    response = v2_stub.ModelInfer(infer_request(rows, raw=True))
    assert [o.name for o in response.outputs] == ["probability_up", "signal", "prediction_id"]
    assert all(not o.HasField("contents") for o in response.outputs)
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f8")
    assert np.array_equal(got, want)
    signals = np.frombuffer(response.raw_output_contents[1], dtype="<i4")
    assert set(signals.tolist()) <= {1, 2, 3} and len(signals) == len(rows)


def test_requested_outputs_only(v2_stub, rows):
    request = infer_request(rows[:3])
    request.outputs.add(name="signal")
    response = v2_stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["signal"]
    assert len(output(response, "signal").contents.int_contents) == 3


def test_liveness_readiness_and_metadata(v2_stub, server):
    assert v2_stub.ServerLive(v2.ServerLiveRequest()).live
    assert v2_stub.ServerReady(v2.ServerReadyRequest()).ready
    assert v2_stub.ModelReady(v2.ModelReadyRequest(name="model_1")).ready
    assert v2_stub.ModelReady(v2.ModelReadyRequest(name="model_1", version="1")).ready
    assert not v2_stub.ModelReady(v2.ModelReadyRequest(name="model_1", version="2")).ready
    assert not v2_stub.ModelReady(v2.ModelReadyRequest(name="model_9")).ready
    meta = v2_stub.ModelMetadata(v2.ModelMetadataRequest(name="model_1"))
    assert meta.name == "model_1" and list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    (tensor,) = meta.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("features", "FP32", [-1, 25])
    assert [(o.name, o.datatype) for o in meta.outputs] == [
        ("probability_up", "FP64"),
        ("signal", "INT32"),
        ("prediction_id", "BYTES"),
    ]
    info = server.running.predictor.model.meta
    assert len(info.feature_names) == N_FEATURES
    assert v2_stub.ServerMetadata(v2.ServerMetadataRequest()).name == "xylen"


def _bad(rows: np.ndarray) -> dict[str, tuple[v2.ModelInferRequest, grpc.StatusCode, str]]:
    cases: dict[str, tuple[v2.ModelInferRequest, grpc.StatusCode, str]] = {}
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    r = infer_request(rows[:2])
    r.inputs[0].datatype = "FP64"
    cases["datatype"] = (r, invalid, "WRONG_DATATYPE")
    r = infer_request(rows[:2])
    r.inputs[0].ClearField("contents")
    r.inputs[0].contents.fp64_contents.extend(rows[:2].ravel().tolist())
    cases["fp64 contents"] = (r, invalid, "WRONG_DATATYPE")
    r = infer_request(rows[:2])
    del r.inputs[0].shape[:]
    r.inputs[0].shape.extend([1, 2, 25])
    cases["rank 3"] = (r, invalid, "WRONG_SHAPE")
    r = infer_request(np.ascontiguousarray(rows[:2, :24]))
    cases["24 features"] = (r, invalid, "FEATURE_COUNT_MISMATCH")
    nan = rows[:3].copy()
    nan[2, 5] = np.nan
    cases["NaN"] = (infer_request(nan), invalid, "NON_FINITE_FEATURE")
    cases["NaN raw"] = (infer_request(nan, raw=True), invalid, "NON_FINITE_FEATURE")
    inf = rows[:1].copy()
    inf[0, 0] = np.inf
    cases["inf"] = (infer_request(inf), invalid, "NON_FINITE_FEATURE")
    cases["model"] = (
        infer_request(rows[:1], model_name="model_9"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"
    )  # fmt: skip
    cases["version"] = (
        infer_request(rows[:1], model_version="7"),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_VERSION_NOT_FOUND",
    )
    r = infer_request(rows[:2], raw=True)
    r.raw_input_contents[0] = r.raw_input_contents[0][:-4]
    cases["raw short"] = (r, invalid, "WRONG_CONTENT_SIZE")
    r = infer_request(rows[:2])
    del r.inputs[0].contents.fp32_contents[-1]
    cases["contents short"] = (r, invalid, "WRONG_CONTENT_SIZE")
    r = infer_request(rows[:2], raw=True)
    r.inputs[0].contents.fp32_contents.extend(rows[:2].ravel().tolist())
    cases["both"] = (r, invalid, "AMBIGUOUS_CONTENTS")
    r = infer_request(rows[:1])
    r.inputs.append(r.inputs[0])
    cases["two inputs"] = (r, invalid, "WRONG_INPUT_COUNT")
    r = infer_request(rows[:1])
    r.inputs[0].name = "input-0"
    cases["input name"] = (r, invalid, "UNKNOWN_INPUT")
    r = infer_request(rows[:1])
    r.outputs.add(name="logits")
    cases["output name"] = (r, invalid, "UNKNOWN_OUTPUT")
    r = infer_request(rows[:1])
    for _ in range(3):  # each repeat would add a whole tensor to the answer
        r.outputs.add(name="probability_up")
    cases["output repeated"] = (r, invalid, "DUPLICATE_OUTPUT")
    r = infer_request(rows[:1])
    r.inputs[0].ClearField("contents")
    cases["no data"] = (r, invalid, "MISSING_INPUT")
    empty = v2.ModelInferRequest(model_name="model_1")
    empty.inputs.add(name="features", datatype="FP32", shape=[0, 25])
    cases["empty"] = (empty, invalid, "EMPTY_BATCH")
    big = v2.ModelInferRequest(model_name="model_1")
    big.inputs.add(name="features", datatype="FP32", shape=[4097, 25])
    cases["too many rows"] = (big, grpc.StatusCode.RESOURCE_EXHAUSTED, "BATCH_TOO_LARGE")
    cases["long name"] = (
        infer_request(rows[:1], model_name="m" * 1000), invalid, "NAME_TOO_LONG"
    )  # fmt: skip
    return cases


@pytest.mark.parametrize("case", list(_bad(np.zeros((4, 25), np.float32))))
def test_bad_tensors_get_clear_statuses(v2_stub, rows, case):
    request, code, reason = _bad(rows)[case]
    with pytest.raises(grpc.RpcError) as caught:
        v2_stub.ModelInfer(request)
    error = caught.value
    assert error.code() == code, error.details()
    assert error_info(error).reason == reason
    assert 0 < len(error.details()) < 300 and "m" * 100 not in error.details()


def test_metrics_count_model_infer(v2_stub, rows, server):
    recorder = server.running.recorder
    harness.settled(recorder)
    ok, refused = recorder.calls(INFER, "OK"), recorder.calls(INFER, "INVALID_ARGUMENT")
    v2_stub.ModelInfer(infer_request(rows[:2]))
    bad = infer_request(rows[:2])
    bad.inputs[0].datatype = "INT8"
    with pytest.raises(grpc.RpcError):
        v2_stub.ModelInfer(bad)
    harness.settled(recorder)
    assert recorder.calls(INFER, "OK") == ok + 1
    assert recorder.calls(INFER, "INVALID_ARGUMENT") == refused + 1


@pytest.fixture(scope="module")
def guarded(models_root: Path) -> Iterator[harness.InProcessServer]:
    settings = harness.server_settings(
        models_root, predict_token="predict-secret", admin_token="admin-secret"
    )
    running = harness.InProcessServer(settings)
    yield running
    running.close()


def test_predict_token_guards_model_infer(guarded, rows):
    with grpc.insecure_channel(guarded.address) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(v2.ServerLiveRequest()).live  # a probe needs no token
        assert stub.ServerReady(v2.ServerReadyRequest()).ready
        for call, request in (
            (stub.ModelInfer, infer_request(rows[:1])),
            (stub.ModelMetadata, v2.ModelMetadataRequest(name="model_1")),
            (stub.ModelReady, v2.ModelReadyRequest(name="model_1")),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call(request)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = (("authorization", "Bearer predict-secret"),)
        answer = stub.ModelInfer(infer_request(rows[:1]), metadata=token)
        assert answer.model_version == "1"


def _triton(address: str, rows: np.ndarray, tmp_path: Path, *token: str) -> dict:
    rows_file = tmp_path / "rows.npy"
    np.save(rows_file, rows)
    probe = subprocess.run(
        [sys.executable, str(HERE / "triton_probe.py"), address, str(rows_file), *token],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    return json.loads(probe.stdout)


def test_tritonclient_answers_equal_predict(server, stub, rows, tmp_path):
    out = _triton(server.address, rows, tmp_path)
    assert out["live"] is True and out["ready"] is True
    assert out["model_ready"] is True and out["other_model_ready"] is False
    meta = out["metadata"]
    assert meta["name"] == "model_1" and meta["versions"] == ["1"]
    assert meta["inputs"][0]["datatype"] == "FP32" and meta["inputs"][0]["shape"] == ["-1", "25"]
    infer = out["infer"]
    assert (infer["model_name"], infer["model_version"], infer["id"]) == ("model_1", "1", "req-7")
    expected = predict(stub, rows).predictions
    want = np.array([p.probability_up for p in expected])
    assert infer["shape"] == [len(rows)]
    assert np.array_equal(np.array(infer["probability_up"]), want)
    assert infer["signal"] == [int(p.signal) for p in expected]
    assert len(set(infer["prediction_id"])) == len(rows)
    assert out["only_probability"]["outputs"] == ["probability_up"]
    assert np.array_equal(np.array(out["only_probability"]["probability_up"]), want)
    for case, status, words in (
        ("nan", "StatusCode.INVALID_ARGUMENT", "must be finite"),
        ("fp64", "StatusCode.INVALID_ARGUMENT", "FP32"),
        ("narrow", "StatusCode.INVALID_ARGUMENT", "24 features per row"),
        ("rank3", "StatusCode.INVALID_ARGUMENT", "shape"),
        ("other_version", "StatusCode.NOT_FOUND", "version '99'"),
        ("other_model", "StatusCode.NOT_FOUND", "model_9"),
    ):
        assert out[case]["status"] == status, (case, out[case])
        assert words in out[case]["message"], (case, out[case])


def test_tritonclient_with_predict_token(guarded, rows, tmp_path):
    out = _triton(guarded.address, rows[:4], tmp_path, "predict-secret")
    assert out["model_ready_without_token"]["status"] == "StatusCode.UNAUTHENTICATED"
    assert out["infer_without_token"]["status"] == "StatusCode.UNAUTHENTICATED"
    assert out["model_ready"] is True and len(out["infer"]["probability_up"]) == 4


def test_grpcurl_lists_both_services_by_reflection(server):
    from server.api.test_grpcurl import run

    listed = run(server.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"xylen.v1.ModelService", "inference.GRPCInferenceService"} <= set(listed.stdout.split())
    described = run(server.address, "describe", "inference.GRPCInferenceService")
    assert "rpc ModelInfer" in described.stdout and "rpc ServerLive" in described.stdout
    body = json.dumps({"name": "model_1"})
    meta = run(server.address, "inference.GRPCInferenceService/ModelMetadata", data=body)
    assert meta.returncode == 0, meta.stderr
    assert json.loads(meta.stdout)["versions"] == ["1"]
