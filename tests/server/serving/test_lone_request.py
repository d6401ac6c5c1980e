"""A request reaching an idle event loop is answered where it stands (no batch, no future, no
extra turn of the loop), with exactly the answer and the log row a batch would have given it;
requests arriving together still share one inference.

Real onnxruntime sessions of a trained LightGBM model, a real Predictor on a real event loop."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from harness import logged_predictor, predict_request

from training.metadata import model_input
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.errors import InvalidArgument
from xylen_server.serving.predictor import Predictor, Result


def test_a_lone_request_is_answered_at_once_with_its_exact_answer_and_log_row(
    models_root, model, feature_rows
):
    rows = feature_rows[:3]

    async def run() -> tuple[Result, int, bool]:
        predictor, logged = logged_predictor(models_root, model)
        answer = await predictor.predict(predict_request(rows))  # nothing else is due on this loop
        assert logged == []  # answered first: logged in the loop's next turn (after the send)
        await asyncio.sleep(0)
        assert len(logged) == 1 and logged[0] is answer  # logged once, as answered
        return answer, predictor.lone_runs, predictor._batch is None

    answer, lone, no_batch = asyncio.run(run())
    assert lone == 1 and no_batch
    assert answer.on_loop and len(answer.prediction_ids) == 3
    expected = model.engine.predict_proba(model_input(rows.astype(np.float64)))
    np.testing.assert_array_equal(answer.raw_probabilities, expected)
    np.testing.assert_array_equal(answer.rows, model_input(rows.astype(np.float64)))
    assert answer.rows.dtype == np.float32
    assert len(set(answer.prediction_ids)) == 3


def test_lone_and_batched_answers_are_the_same(models_root, model, feature_rows):
    requests = [predict_request(feature_rows[i : i + 2]) for i in range(0, 16, 2)]

    async def alone() -> tuple[list[Result], Predictor]:
        predictor, _ = logged_predictor(models_root, model)
        answers = []
        for request in requests:  # each in a turn of its own, as a server's calls come
            answers.append(await predictor.predict(request))
            await asyncio.sleep(0)
        return answers, predictor

    async def together() -> tuple[list[Result], Predictor, list[Result]]:
        predictor, logged = logged_predictor(models_root, model)
        answers = await asyncio.gather(*(predictor.predict(r) for r in requests))
        return answers, predictor, logged

    lone, lone_predictor = asyncio.run(alone())
    batched, predictor, logged = asyncio.run(together())
    # One at a time: every request ran by itself, at once. Together: one shared inference.
    assert lone_predictor.lone_runs == lone_predictor.loop_runs == len(requests)
    assert predictor.lone_runs == 0 and predictor.loop_runs == len(logged) == 1
    assert len(logged[0].prediction_ids) == 2 * len(requests)
    for a, b in zip(lone, batched, strict=True):
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
        np.testing.assert_array_equal(a.raw_probabilities, b.raw_probabilities)
        np.testing.assert_array_equal(a.rows, b.rows)
        assert a.signals == b.signals and a.on_loop and b.on_loop
        assert a.rows.dtype == b.rows.dtype == np.float32


def test_a_request_arriving_while_the_loop_is_busy_still_waits_for_its_batch(
    models_root, model, feature_rows
):
    async def run() -> tuple[Result, Predictor, list[Result]]:
        predictor, logged = logged_predictor(models_root, model)
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: None)  # something else is due in this turn
        task = asyncio.create_task(predictor.predict(predict_request(feature_rows[:1])))
        await asyncio.sleep(0)
        assert predictor._batch is not None and not task.done()  # waiting for its batch
        return await task, predictor, logged

    answer, predictor, logged = asyncio.run(run())
    assert predictor.lone_runs == 0 and predictor.loop_runs == 1 and logged[0].on_loop
    assert logged[0].prediction_ids == answer.prediction_ids


def test_a_bad_lone_request_is_refused_and_leaves_nothing_behind(models_root, model):
    short = pb.PredictRequest(
        inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=[1.0] * 3))]
    )
    nan = pb.PredictRequest(
        inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=[float("nan")] * 25))]
    )

    async def run() -> tuple[list[BaseException], Predictor, list[Result]]:
        predictor, logged = logged_predictor(models_root, model)
        errors = []
        for request in (short, nan):
            with pytest.raises(InvalidArgument) as caught:
                await predictor.predict(request)
            errors.append(caught.value)
        return errors, predictor, logged

    errors, predictor, logged = asyncio.run(run())
    assert [e.reason for e in errors] == ["FEATURE_COUNT_MISMATCH", "NON_FINITE_FEATURE"]
    assert logged == [] and predictor.loop_runs == 0 and predictor._batch is None
    assert predictor._served is not None and predictor._served.inflight == 0


def test_a_failing_log_hook_is_reported_after_the_answer_and_fails_no_call(
    models_root, model, feature_rows
):
    """The log hook runs in the loop's next turn: its error goes to the loop's exception
    handler (logged), the answer already given stands, and the next call is answered too."""

    async def run() -> tuple[list[Result], list[dict]]:
        predictor, _ = logged_predictor(models_root, model)
        reported: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))

        def broken(result: Result) -> None:
            raise OSError("the log's disk is gone")

        predictor.on_answer = broken
        answers = []
        for rows in (feature_rows[:1], feature_rows[1:3]):  # the value path and the matrix path
            answers.append(await predictor.predict(predict_request(rows)))
            await asyncio.sleep(0)
        return answers, reported

    answers, reported = asyncio.run(run())
    assert [len(a.prediction_ids) for a in answers] == [1, 2]
    assert [str(ctx["exception"]) for ctx in reported] == ["the log's disk is gone"] * 2
