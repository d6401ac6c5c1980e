"""Unary calls are counted and timed in the loop's turn after they end, all those ending in one
turn under one taking of the recorder's lock (:meth:`Recorder.calls_ended`): under load every
call is still counted once, by method, status code and reason, and none stays in flight. The
predictor's answers reach the prediction log in that same callback, and one hand-over failing
stops neither the others nor the metrics. Real servers on loopback ports."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import InProcessServer, feature_input, server_settings, settled

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.serving.predictor import Result

PREDICT = "/xylen.v1.ModelService/Predict"


def test_calls_ending_together_are_each_counted_once(
    models_root: Path, feature_rows: np.ndarray
) -> None:
    server = InProcessServer(server_settings(models_root))
    recorder = server.running.recorder
    flushes: list[int] = []
    record = recorder.calls_ended

    def counting(calls: list[tuple[str, str, float, str]]) -> None:
        flushes.append(len(calls))
        record(calls)

    recorder.calls_ended = counting  # type: ignore[method-assign]
    good = [pb.PredictRequest(inputs=[feature_input(row)]) for row in feature_rows[:48]]
    bad = [pb.PredictRequest(inputs=[feature_input([1.0, 2.0])]) for _ in range(12)]

    async def calls() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)

            async def one(request: pb.PredictRequest) -> grpc.StatusCode:
                try:
                    await stub.Predict(request)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            requests = [r for pair in zip(good[::4], bad, strict=True) for r in pair]
            requests += [r for i, r in enumerate(good) if i % 4]
            return list(await asyncio.gather(*(one(r) for r in requests)))

    try:
        codes = asyncio.run(calls())
        assert codes.count(grpc.StatusCode.OK) == 48
        assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) == 12
        settled(recorder)
        assert recorder.in_flight() == 0
        assert recorder.calls(PREDICT, "OK") == 48
        assert recorder.calls(PREDICT, "INVALID_ARGUMENT") == 12
        assert recorder.errors(PREDICT, "FEATURE_COUNT_MISMATCH") == 12
        durations = recorder.durations
        assert durations is not None
        series = durations.snapshot()  # bucket counts, then the sum of seconds
        assert sum(series[(PREDICT, "OK")][:-1]) == 48
        assert sum(series[(PREDICT, "INVALID_ARGUMENT")][:-1]) == 12
        # Calls that ended in the same turn were recorded together
        assert sum(flushes) == 60 and len(flushes) < 60 and max(flushes) > 1
    finally:
        server.close()


def test_a_failing_hand_over_after_an_answer_stops_nothing_else(
    models_root: Path, feature_rows: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    """The predictor's answers reach the prediction log in the same callback as the calls'
    metrics (CallInterceptor.after_the_answer): one that fails is logged, and the other
    answers and every call's metrics are still handed over."""
    server = InProcessServer(server_settings(models_root))
    predictor = server.running.predictor
    assert predictor.after_the_answer is not None  # the server wired it
    recorder = server.running.recorder
    logged = predictor.on_answer
    assert logged is not None
    seen: list[int] = []

    def failing_once(result: Result) -> None:
        seen.append(len(result.prediction_ids))
        if len(seen) == 1:
            raise RuntimeError("the log is full")
        logged(result)

    predictor.on_answer = failing_once
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            answers = [
                stub.Predict(pb.PredictRequest(inputs=[feature_input(row)]))
                for row in feature_rows[:5]
            ]
        settled(recorder)
        assert recorder.calls(PREDICT, "OK") == 5
        assert sum(seen) == 5  # every answer handed over, the failing one too
        ids = [a.predictions[0].prediction_id for a in answers]
        log = server.running.feedback.log
        assert [log.get(i) is not None for i in ids] == [False, True, True, True, True]
        assert "the work handed over after an answer failed" in caplog.text
        assert "the log is full" in caplog.text
    finally:
        server.close()
