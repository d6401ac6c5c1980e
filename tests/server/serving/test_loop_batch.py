"""Dynamic batching on the event loop: requests that reach the loop's session together share one
inference, and each still gets exactly its own answer, its own errors, its own ids and its own
log rows; a cancelled caller, a failing engine and a hot swap leave nothing held.

Real onnxruntime sessions of a trained LightGBM model, a real Predictor on a real event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import numpy as np
from harness import logged_predictor, predict_request, server_settings

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.errors import InvalidArgument
from xylen_server.serving.model_store import load_model
from xylen_server.serving.predictor import (
    LOOP_BATCH_MAX_ROWS,
    LOOP_BATCH_MAX_TURNS,
    Predictor,
    Result,
)


def test_requests_arriving_together_share_an_inference_and_get_their_own_answers(
    models_root, model, feature_rows
):
    # 40 requests of 1 to 3 rows (80 rows): more than one run's LOOP_BATCH_MAX_ROWS in all.
    sizes = [1 + i % 3 for i in range(40)]
    starts = np.cumsum([0, *sizes])
    requests = [predict_request(feature_rows[a:b]) for a, b in itertools.pairwise(starts)]

    async def alone() -> list[Result]:
        predictor, _ = logged_predictor(models_root, model)
        answers = []
        for request in requests:  # one at a time, each in a turn of its own: one run each
            answers.append(await predictor.predict(request))
            await asyncio.sleep(0)  # the answer is logged in the next turn
        return answers

    async def together() -> tuple[list[Result], Predictor, list[Result]]:
        predictor, logged = logged_predictor(models_root, model)
        answers = await asyncio.gather(*(predictor.predict(r) for r in requests))
        return answers, predictor, logged

    one_by_one = asyncio.run(alone())
    answers, predictor, logged = asyncio.run(together())

    rows = int(starts[-1])
    assert rows > LOOP_BATCH_MAX_ROWS
    runs = -(-rows // LOOP_BATCH_MAX_ROWS)
    assert predictor.loop_runs == len(logged) == runs  # 40 requests, 2 inferences
    for answer, single, size in zip(answers, one_by_one, sizes, strict=True):
        assert answer.on_loop and len(answer.probabilities) == len(answer.feature_matrix()) == size
        np.testing.assert_array_equal(answer.probabilities, single.probabilities)
        np.testing.assert_array_equal(answer.raw_probabilities, single.raw_probabilities)
        np.testing.assert_array_equal(answer.feature_matrix(), single.feature_matrix())
        assert answer.signals == single.signals
        assert len(answer.prediction_ids) == size
    assert len(set(np.round(np.concatenate([a.probabilities for a in answers]), 6))) > 5
    # The log got every row once, in runs of at most LOOP_BATCH_MAX_ROWS, with the rows,
    # probabilities and signals each caller was answered with.
    ids = [i for a in answers for i in a.prediction_ids]
    assert len(set(ids)) == len(ids) == rows
    assert [i for run in logged for i in run.prediction_ids] == ids
    assert all(len(run.prediction_ids) <= LOOP_BATCH_MAX_ROWS for run in logged)
    np.testing.assert_array_equal(
        np.concatenate([run.rows for run in logged]),
        np.concatenate([a.feature_matrix() for a in answers]),
    )
    np.testing.assert_array_equal(
        np.concatenate([run.probabilities for run in logged]),
        np.concatenate([a.probabilities for a in answers]),
    )
    signals = [s for a in answers for s in a.signals]
    assert [s for run in logged for s in run.signals] == signals
    assert predictor._served is not None and predictor._served.inflight == 0


def test_a_refused_request_on_a_busy_loop_leaves_no_batch(models_root, model, feature_rows):
    """The first request of a would-be batch refused: no batch is left waiting for nobody."""
    short = pb.PredictRequest(
        inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=[1.0] * 3))]
    )

    async def run() -> tuple[object, Predictor]:
        predictor, _ = logged_predictor(models_root, model)
        asyncio.get_running_loop().call_soon(lambda: None)  # the loop has work waiting
        try:
            await predictor.predict(short)
        except InvalidArgument as exc:
            assert predictor._batch is None
            await asyncio.sleep(0)
            return exc, predictor
        raise AssertionError("the short row was answered")

    refused, predictor = asyncio.run(run())
    assert isinstance(refused, InvalidArgument) and refused.reason == "FEATURE_COUNT_MISMATCH"
    assert predictor.loop_runs == 0
    assert predictor._served is not None and predictor._served.inflight == 0


def test_a_bad_request_in_a_batch_fails_alone(models_root, model, feature_rows):
    short = pb.PredictRequest(
        inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=[1.0] * 3))]
    )

    async def run() -> tuple[list[object], Predictor, list[Result]]:
        predictor, logged = logged_predictor(models_root, model)
        requests = [predict_request(feature_rows[i : i + 1]) for i in range(6)]
        requests.insert(3, short)
        answers = await asyncio.gather(
            *(predictor.predict(r) for r in requests), return_exceptions=True
        )
        return answers, predictor, logged

    answers, predictor, logged = asyncio.run(run())
    bad = answers.pop(3)
    assert isinstance(bad, InvalidArgument) and bad.reason == "FEATURE_COUNT_MISMATCH"
    assert all(isinstance(a, Result) for a in answers)
    assert predictor.loop_runs == 1 and len(logged[0].prediction_ids) == 6


def test_a_cancelled_caller_is_not_run_and_the_others_are_answered(
    models_root, model, feature_rows
):
    async def run() -> tuple[list[Result], Predictor, list[Result], bool]:
        predictor, logged = logged_predictor(models_root, model)
        tasks = [
            asyncio.create_task(predictor.predict(predict_request(feature_rows[i : i + 1])))
            for i in range(5)
        ]
        await asyncio.sleep(0)  # every task has featurised and joined the batch
        assert predictor._batch is not None and len(predictor._batch.answers) == 5
        tasks[2].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        cancelled = isinstance(done.pop(2), asyncio.CancelledError)
        return done, predictor, logged, cancelled  # type: ignore[return-value]

    answers, predictor, logged, cancelled = asyncio.run(run())
    assert cancelled
    assert [len(a.prediction_ids) for a in answers] == [1, 1, 1, 1]
    assert len(logged) == 1 and len(logged[0].prediction_ids) == 4  # the cancelled row: not run
    np.testing.assert_array_equal(logged[0].rows[2], answers[2].feature_matrix()[0])  # row 3 up
    assert predictor._served is not None and predictor._served.inflight == 0


def test_an_engine_failure_fails_every_request_of_its_run_and_releases_the_model(
    models_root, model, feature_rows
):
    class Broken(Exception):
        pass

    def fail(rows: np.ndarray) -> np.ndarray:
        raise Broken(f"no inference for {len(rows)} rows")

    # The model's real engine, its loop entry point made to fail for this test.
    engine = model.engine
    original = engine.predict_on_loop

    async def run() -> tuple[list[object], Predictor]:
        predictor, _ = logged_predictor(models_root, model)
        requests = [predict_request(feature_rows[i : i + 1]) for i in range(4)]
        return await asyncio.gather(
            *(predictor.predict(r) for r in requests), return_exceptions=True
        ), predictor

    engine.predict_on_loop = fail  # type: ignore[method-assign]
    try:
        answers, predictor = asyncio.run(run())
    finally:
        engine.predict_on_loop = original  # type: ignore[method-assign]
    assert all(isinstance(a, Broken) and "4 rows" in str(a) for a in answers), answers
    assert predictor._served is not None and predictor._served.inflight == 0
    assert predictor.loop_runs == 0


def test_a_swap_waits_for_the_batch_its_requests_joined(models_root, model, feature_rows):
    newer = load_model(server_settings(models_root))
    newer = dataclasses.replace(
        newer, meta=dataclasses.replace(newer.meta, version=2), loop_max_rows=8
    )
    answered_at_close: list[bool] = []
    engine = model.engine
    real_close = engine.close

    async def run() -> tuple[list[Result], Result]:
        predictor, _ = logged_predictor(models_root, model)
        tasks = [
            asyncio.create_task(predictor.predict(predict_request(feature_rows[i : i + 1])))
            for i in range(4)
        ]
        await asyncio.sleep(0)  # the four are in the batch, not yet inferred
        batch = predictor._batch
        assert batch is not None and not any(a.done() for a in batch.answers)
        # The swap closes the replaced model: record whether every answer was given by then
        # (instead of closing it: the module's other tests still serve it).
        engine.close = lambda: answered_at_close.append(all(a.done() for a in batch.answers))  # type: ignore[method-assign]
        replaced = await predictor.swap(newer, grace_seconds=10)
        assert replaced is model
        answers = [await t for t in tasks]
        after = await predictor.predict(predict_request(feature_rows[10:11]))
        return answers, after

    try:
        answers, after = asyncio.run(run())
    finally:
        engine.close = real_close  # type: ignore[method-assign]
        newer.close()
    assert [a.model.meta.version for a in answers] == [1, 1, 1, 1]
    assert answered_at_close == [True]  # closed only once all four had their answer
    assert after.model.meta.version == 2


def test_a_batch_waits_for_the_busy_loop_at_most_its_turns(models_root, model, feature_rows):
    """While other callbacks keep the loop busy, requests reaching it in the next turns join
    the batch; it runs once the loop has had LOOP_BATCH_MAX_TURNS turns with work waiting."""
    predictor, logged = logged_predictor(models_root, model)
    turns: list[int] = []  # the turn each logged run was handed over in

    async def main() -> list[Result]:
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[Result]] = []
        on_answer = predictor.on_answer
        assert on_answer is not None

        def handed(result: Result) -> None:
            turns.append(len(busy_turns))
            on_answer(result)

        predictor.on_answer = handed
        busy_turns: list[int] = []

        def busy(turn: int) -> None:  # one callback every turn, for 40 turns
            busy_turns.append(turn)
            if turn < 5:  # a request reaches the loop in each of the first five turns
                request = predict_request(feature_rows[turn : turn + 1])
                tasks.append(asyncio.ensure_future(predictor.predict(request)))
            if turn < 40:
                loop.call_soon(busy, turn + 1)

        busy(0)
        while len(tasks) < 5:
            await asyncio.sleep(0)
        return list(await asyncio.wait_for(asyncio.gather(*tasks), 10))

    answers = asyncio.run(main())
    assert predictor.loop_runs == 1 and len(logged) == 1  # the five shared one inference
    assert [i for a in answers for i in a.prediction_ids] == logged[0].prediction_ids
    # It ran after its turns ran out, not after the busy loop's 40 turns nor in its first
    assert LOOP_BATCH_MAX_TURNS <= turns[0] <= LOOP_BATCH_MAX_TURNS + 3
