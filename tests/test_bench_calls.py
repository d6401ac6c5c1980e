"""``python -m bench calls``'s counter (``bench/callcount``): a real server process started with
it counts its event-loop thread's calls between SIGUSR1 and SIGUSR2, the handler's steps once
per lone Predict; without the variable it installs nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np

from bench.bench_calls import CALL_COUNT, count, counting_env
from bench.bench_server import REPO, build_model, start_xylen, xylen_env
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2

SIGUSR1_BIT = 1 << (10 - 1)


def _caught(pid: int) -> int:
    """The process's caught-signals mask (/proc's SigCgt)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("SigCgt:")[1].split()[0], 16)


def _request(row: np.ndarray) -> pb.PredictRequest:
    return pb.PredictRequest(
        inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=row.tolist()))]
    )


def test_a_lone_predict_is_counted_step_by_step(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _, rows = build_model(models, trees=20)
    out = tmp_path / "counts.tsv"
    server = start_xylen(models, counting_env(xylen_env(models), out))
    try:
        assert _caught(server.proc.pid) & SIGUSR1_BIT

        async def counted():  # type: ignore[no-untyped-def]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.ModelServiceStub(channel)
                request = _request(rows[0])
                return await count(server.proc.pid, out, lambda: stub.Predict(request), 1, 1.0)

        got = asyncio.run(counted())
    finally:
        server.stop()
    assert got.answered > 20
    own = dict((name, times) for times, name in got.own(REPO))
    # One call in flight: each Predict is answered alone, every step once
    for step in (
        "xylen_server/api/servicer.py:ModelServicer.Predict",
        "xylen_server/serving/predictor.py:Predictor.answer",
        "xylen_server/serving/predictor.py:Predictor._alone_value",
        "xylen_server/api/messages.py:predict_response",
    ):
        assert abs(own[step] - 1.0) < 0.05, (step, own[step])
    assert got.per_request("py") > sum(own.values()) > 10  # asyncio's and grpc's calls too
    assert got.per_request("c") > 10


def test_without_the_variable_nothing_is_installed(tmp_path: Path) -> None:
    models = tmp_path / "models"
    build_model(models, trees=5)
    env = xylen_env(models) | {"PYTHONPATH": str(CALL_COUNT)}
    server = start_xylen(models, env)
    try:
        assert not _caught(server.proc.pid) & SIGUSR1_BIT
    finally:
        server.stop()
