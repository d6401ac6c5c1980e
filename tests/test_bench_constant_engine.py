"""``python -m bench server``'s engine-free xylen (``bench/constant_engine``): with the variable
set, the loop's inference answers a constant and everything else a Predict does still runs (a
bad row is still refused); without it, nothing changes. Real server processes, real model."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.bench_server import CONSTANT_ENGINE, build_model, start_xylen
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2


def _request(row: np.ndarray) -> pb.PredictRequest:
    return pb.PredictRequest(
        inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=row.tolist()))]
    )


def _raw_answers(port: int, rows: list[np.ndarray]) -> list[float]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        return [
            stub.Predict(_request(row), timeout=30).predictions[0].raw_probability_up
            for row in rows
        ]


def test_the_constant_engine_answers_its_constant_and_still_checks_every_row(
    tmp_path: Path,
) -> None:
    _, rows = build_model(tmp_path, trees=20)
    # Rows the real model tells apart.
    picked = [rows[0], *[row for row in rows[1:200] if not np.allclose(row, rows[0])][:5]]
    real = start_xylen(tmp_path)
    try:
        answers = _raw_answers(real.port, picked)
    finally:
        real.stop()
    assert len(set(answers)) > 1, "the real model answers every row alike: a useless check"

    constant = start_xylen(
        tmp_path, {"PYTHONPATH": str(CONSTANT_ENGINE), "XYLEN_BENCH_CONSTANT_ENGINE": "0.25"}
    )
    try:
        assert _raw_answers(constant.port, picked) == [0.25] * len(picked)
        bad = picked[0].copy()
        bad[3] = math.nan
        with (
            grpc.insecure_channel(f"127.0.0.1:{constant.port}") as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            pb_grpc.ModelServiceStub(channel).Predict(_request(bad), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        constant.stop()


def test_without_the_variable_the_directory_changes_nothing(tmp_path: Path) -> None:
    _, rows = build_model(tmp_path, trees=20)
    picked = [rows[0], rows[57], rows[113]]
    plain = start_xylen(tmp_path)
    try:
        expected = _raw_answers(plain.port, picked)
    finally:
        plain.stop()
    on_path = start_xylen(tmp_path, {"PYTHONPATH": str(CONSTANT_ENGINE)})
    try:
        assert _raw_answers(on_path.port, picked) == expected
    finally:
        on_path.stop()


def test_the_canned_server_parses_the_request_and_answers_one_prediction_of_xylen_s_shape() -> None:
    from bench.bench_server import Process
    from bench.canned_server import ANSWER

    server = Process([sys.executable, "-m", "bench.canned_server"], dict(os.environ), "canned")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            answer = stub.Predict(_request(np.arange(25, dtype=np.float64)), timeout=30)
            assert answer == ANSWER and len(answer.predictions) == 1
            fields = {f.name for f, _ in answer.predictions[0].ListFields()}
            assert fields == {
                "prediction_id", "probability_up", "signal", "model_name", "model_version",
                "raw_probability_up",
            }  # fmt: skip
            undecodable = channel.unary_unary("/xylen.v1.ModelService/Predict")
            with pytest.raises(grpc.RpcError):  # it parses what it gets
                undecodable(b"\xff\xff\xff", timeout=30)
    finally:
        server.stop()
