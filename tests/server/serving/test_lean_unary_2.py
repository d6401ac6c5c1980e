"""The second round of the lean unary path: what each shortcut keeps exactly as it was."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from training import features
from training.metadata import INPUT_NAME, PROBABILITIES_OUTPUT, model_input
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server import clock
from xylen_server.api import limits, messages
from xylen_server.errors import InvalidArgument, ResourceExhausted
from xylen_server.learning.prediction_log import PredictionLog
from xylen_server.serving.inputs import feature_rows as feature_rows_of
from xylen_server.serving.predictor import Predictor, Result
from xylen_server.serving.session_pool import SessionPool
from xylen_server.settings import Settings


def test_the_pool_runs_the_compiled_session_with_the_public_api_s_answers(model, feature_rows):
    """The session's binding is called without onnxruntime's Python wrapper: the same
    probabilities for one row and many, and the same refusal of a wrong input."""
    pool = model.engine
    assert isinstance(pool, SessionPool)
    public = pool._session
    assert pool._run == public._sess.run  # the binding, not the wrapper
    for rows in (feature_rows[:1], feature_rows[:7]):
        x = model_input(np.asarray(rows, dtype=np.float64))
        expected = public.run([PROBABILITIES_OUTPUT], {INPUT_NAME: x})[0][:, 1]
        got = pool.predict_on_loop(x)
        assert got.dtype == np.float64 and got.shape == (len(rows),)
        np.testing.assert_array_equal(got, expected.astype(np.float64))
        np.testing.assert_array_equal(pool.predict_proba(x), got)
    wrong = np.zeros((1, 3), dtype=np.float32)
    with pytest.raises(Exception) as binding_error:
        pool.predict_proba(wrong)
    with pytest.raises(Exception) as public_error:
        public.run([PROBABILITIES_OUTPUT], {INPUT_NAME: wrong})
    assert type(binding_error.value) is type(public_error.value)


F32_MAX = float(np.finfo(np.float32).max)
LOOKBACK = features.LOOKBACK_PERIODS


def _exact_reason(matrix: np.ndarray) -> str | None:
    """What the exact test (before the dot-product shortcut) says of ``matrix``."""
    if not np.isfinite(matrix).all():
        return "NON_FINITE_FEATURE"
    if not np.abs(matrix).max() <= F32_MAX:
        return "FEATURE_OUT_OF_RANGE"
    return None


def _request(rows: np.ndarray) -> pb.PredictRequest:
    return pb.PredictRequest(
        inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=list(r))) for r in rows]
    )


@pytest.mark.parametrize(
    "value",
    [
        0.0,
        1.0,
        F32_MAX,  # the largest value float32 holds is in range
        -F32_MAX,
        np.nextafter(F32_MAX, np.inf),  # the next double is not
        -np.nextafter(F32_MAX, np.inf),
        1e39,
        1e200,  # its square overflows to inf
        float("inf"),
        float("-inf"),
        float("nan"),
        1e-300,
        F32_MAX / 2,  # valid values whose sum of squares passes F32_MAX squared
    ],
)
@pytest.mark.parametrize("rows", [1, 3])
def test_feature_rows_accept_and_refuse_exactly_as_the_exact_test(value, rows, feature_rows):
    """The one-row path and the sum-of-squares shortcut refuse exactly the values the exact
    test refuses, with its reason and row, and return the same float64 matrix otherwise."""
    matrix = np.array(feature_rows[:rows], dtype=np.float64)
    if value == F32_MAX / 2:
        matrix[-1, :] = value  # every value large: only the exact test can tell
    else:
        matrix[-1, 3] = value
    expected = _exact_reason(matrix)
    n = matrix.shape[1]
    request = _request(matrix)
    if expected is None:
        got = feature_rows_of(request.inputs, n, LOOKBACK, 4096)
        assert got.dtype == np.float64 and got.shape == matrix.shape
        np.testing.assert_array_equal(got, matrix)
    else:
        with pytest.raises(InvalidArgument) as caught:
            feature_rows_of(request.inputs, n, LOOKBACK, 4096)
        assert caught.value.reason == expected
        assert caught.value.metadata["row"] == str(rows - 1)


def test_a_big_matrix_takes_the_exact_test(feature_rows):
    """More values than the dot product is used for: judged by the exact test alone."""
    rows = np.resize(np.asarray(feature_rows, dtype=np.float64), (200, feature_rows.shape[1]))
    assert rows.size > 4096
    rows[150, 2] = 1e39
    with pytest.raises(InvalidArgument) as caught:
        feature_rows_of(_request(rows).inputs, rows.shape[1], LOOKBACK, 4096)
    assert caught.value.reason == "FEATURE_OUT_OF_RANGE" and caught.value.metadata["row"] == "150"
    rows[150, 2] = 1.0
    np.testing.assert_array_equal(
        feature_rows_of(_request(rows).inputs, rows.shape[1], LOOKBACK, 4096), rows
    )


def test_one_row_of_the_wrong_width_or_no_input_is_refused_as_before(feature_rows):
    n = feature_rows.shape[1]
    with pytest.raises(InvalidArgument) as caught:
        feature_rows_of(_request(np.zeros((1, n - 1))).inputs, n, LOOKBACK, 4096)
    assert caught.value.reason == "FEATURE_COUNT_MISMATCH"
    assert caught.value.metadata == {"row": "0", "expected": str(n), "got": str(n - 1)}
    with pytest.raises(InvalidArgument) as caught:
        feature_rows_of(pb.PredictRequest(inputs=[pb.PredictInput()]).inputs, n, LOOKBACK, 4096)
    assert caught.value.reason == "MISSING_INPUT"


def test_check_predict_still_holds_every_limit_of_one_row():
    """The one-row shortcut of the limits still refuses a long name and a long window."""
    settings = Settings(max_name_bytes=8, max_window_candles=5)
    with pytest.raises(InvalidArgument) as caught:
        limits.check_predict(pb.PredictRequest(model_name="x" * 9), settings)
    assert caught.value.reason == "NAME_TOO_LONG"
    limits.check_predict(pb.PredictRequest(model_name="é" * 4), settings)  # 8 bytes: fits
    window = pb.PredictInput(candles=types_pb2.CandleWindow(candles=[types_pb2.Candle()] * 6))
    with pytest.raises(ResourceExhausted) as caught:
        limits.check_predict(pb.PredictRequest(inputs=[window]), settings)
    assert caught.value.reason == "WINDOW_TOO_LONG"
    one = pb.PredictInput(features=types_pb2.FeatureVector(values=[1.0]))
    limits.check_predict(pb.PredictRequest(inputs=[one]), settings)
    with pytest.raises(ResourceExhausted):
        limits.check_predict(pb.PredictRequest(inputs=[one, window]), settings)


def test_one_row_records_as_the_predictor_hands_them_over_log_what_any_form_logs(tmp_path):
    """A (1, width) float32 row and a float64 probability array (what the predictor hands
    over, taken as they are) are logged exactly as the same row given as lists; age eviction
    and the flush-by-rows signal still work one row at a time."""
    row = np.array([[0.1, -2.5, 3e-39, 7.0]], dtype=np.float32)
    arrays = PredictionLog(None, max_age_seconds=60)
    lists = PredictionLog(None, max_age_seconds=60)
    now = clock.now_ms()
    arrays.record(["old"], row, np.array([0.25]), [3], "m", 1, time_ms=now - 120_000)
    arrays.record(["a"], row, np.array([0.75]), [1], "m", 2, time_ms=now)
    lists.record(["a"], row.astype(np.float64).tolist(), [0.75], [1], "m", 2, time_ms=now)
    got, expected = arrays.get("a"), lists.get("a")
    assert got is not None and expected is not None
    assert (got.time_ms, got.model_name, got.model_version) == (now, "m", 2)
    assert (
        (got.probability_up, got.signal) == (0.75, 1) == (expected.probability_up, expected.signal)
    )
    assert got.features.dtype == np.float32
    np.testing.assert_array_equal(got.features, row[0])
    np.testing.assert_array_equal(got.features, expected.features)
    assert arrays.get("old") is None and len(arrays) == 1  # evicted by age

    flushing = PredictionLog(tmp_path, flush_rows=3, flush_interval_seconds=3600)
    try:
        for i in range(3):
            flushing.record([f"r{i}"], row, np.array([0.5]), [3], "m", 1)
        deadline = time.monotonic() + 10
        while not list(tmp_path.glob("*.parquet")):
            assert time.monotonic() < deadline, "three one-row records never woke the flusher"
            time.sleep(0.01)
    finally:
        flushing.close()


def _response_as_before(result: Result) -> pb.PredictResponse:
    """predict_response as it was before its one-row path (the reference)."""
    raw = result.probabilities if result.raw_probabilities is None else result.raw_probabilities
    response = pb.PredictResponse()
    for prediction_id, probability, signal, raw_probability in zip(
        result.prediction_ids,
        result.probabilities.tolist(),
        result.signals,
        raw.tolist(),
        strict=True,
    ):
        response.predictions.add(
            prediction_id=prediction_id,
            probability_up=probability,
            signal=signal,
            model_name=result.model.meta.name,
            model_version=result.model.meta.version,
            raw_probability_up=raw_probability,
        )
    duration = response.inference_duration
    duration.seconds, duration.nanos = divmod(int(result.seconds * 1e9), 1_000_000_000)
    return response


@pytest.mark.parametrize("seconds", [0.0, 1.25e-5, 0.999999999, 1.0, 2.5])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("calibrated", [False, True])
def test_predict_response_of_one_row_is_the_loop_s(model, seconds, rows, calibrated):
    probabilities = np.linspace(0.2, 0.8, rows)
    raw = probabilities / 2 if calibrated else None
    result = Result(
        model,
        probabilities,
        [1, 2, 3][:rows],
        [f"p-{i}" for i in range(rows)],
        seconds,
        np.zeros((rows, 4), dtype=np.float32),
        raw_probabilities=raw,
    )
    got = messages.predict_response(result)
    assert got == _response_as_before(result)
    assert got.SerializeToString(deterministic=True) == _response_as_before(
        result
    ).SerializeToString(deterministic=True)
    assert len(got.predictions) == rows


def test_predict_response_refuses_mismatched_lengths_as_before(model):
    result = Result(model, np.array([0.5]), [1, 2], ["a"], 0.0, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError):
        messages.predict_response(result)


def test_model_input_snaps_exactly_the_values_it_snapped_before():
    """model_input's cheaper test (count_nonzero, a float32 threshold) snaps the same values."""
    threshold = np.float32(1e-35)
    edge = [
        1e-35,
        -1e-35,
        float(np.nextafter(threshold, np.float32(1))),
        float(np.nextafter(threshold, np.float32(0))),
        5e-36,
        0.0,
        -0.0,
        1.0,
        float("nan"),
        float("inf"),
        1e-30,
    ]
    rng = np.random.default_rng(3)
    for rows in (np.array([edge]), np.array([edge[:4], edge[4:8]]), rng.normal(size=(5, 11))):
        for given in (rows, rows.astype(np.float32)):
            before = np.array(given, dtype=np.float32)
            before[np.abs(before) <= 1e-35] = 0.0
            got = model_input(given)
            assert got.dtype == np.float32 and got is not given
            np.testing.assert_array_equal(got, before)
            assert np.array_equal(np.signbit(got), np.signbit(before))


def test_the_kept_loop_is_the_running_one_across_loops_and_threads(model, feature_rows):
    """The predictor keeps the loop it found (no getpid per lone request) but never answers
    on a stale one: a second asyncio.run, and a loop in another thread while the first still
    runs, each get their own, and lone requests are answered on each."""
    predictor = Predictor(Settings())
    predictor.install(model)
    request = pb.PredictRequest(
        inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=list(feature_rows[0])))]
    )
    seen: list[tuple[bool, int]] = []

    async def ask() -> None:
        loop = asyncio.get_running_loop()
        assert predictor._running_loop() is loop
        result = await predictor.predict(request)
        seen.append((predictor._running_loop() is loop, len(result.prediction_ids)))
        await asyncio.sleep(0)  # its log row, in the next turn

    asyncio.run(ask())
    asyncio.run(ask())  # a new loop on the same thread: the first one is closed

    async def ask_from_a_thread_while_running() -> None:
        await asyncio.get_running_loop().run_in_executor(None, lambda: asyncio.run(ask()))
        await ask()  # back on this loop after the other thread's

    asyncio.run(ask_from_a_thread_while_running())
    assert seen == [(True, 1)] * 4
    assert predictor.lone_runs == 4
