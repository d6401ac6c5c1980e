"""A lone one-row request answered in Python floats (``Predictor._alone_value``): the row's values
checked in C passes (``feature_values``), written straight into the engine's bound buffer
(``SessionPool.predict_value``), calibrated by ``apply_one`` and logged from the list. Every step
is held to the matrix path's answer bit for bit: the float32 row the model ran on, P(up) raw and
calibrated, the signal, the log row; and every row the fast path cannot take as it is (a value
model_input would snap to zero, a refusal) still takes the matrix path and its refusals.

Real onnxruntime sessions of trained LightGBM, XGBoost and CatBoost models, a real Predictor on
a real event loop, a real prediction log."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math

import numpy as np
import pytest
from harness import logged_predictor, predict_request, server_settings, write_model

from training.calibration import EPS, apply, apply_one
from training.features import LOOKBACK_PERIODS
from training.metadata import model_input
from training.onnx_export import export_onnx
from xylen_server.errors import InvalidArgument
from xylen_server.learning.prediction_log import PredictionLog
from xylen_server.serving.inputs import _F32_MAX, _TINY, feature_rows, feature_values
from xylen_server.serving.model_store import load_model
from xylen_server.serving.predictor import Result
from xylen_server.serving.session_pool import SessionPool

F32_TINY = float(np.float32(1e-35))
EDGES = [
    0.0,
    -0.0,
    1e-35,
    -1e-35,
    F32_TINY,
    np.nextafter(F32_TINY, 1.0),
    np.nextafter(F32_TINY, 0.0),
    1.5e-35,
    _TINY,
    -_TINY,
    np.nextafter(_TINY, 1.0),
    -np.nextafter(_TINY, 1.0),
    1e-30,
    1e-45,  # a float32 subnormal
    5e-324,  # the smallest float64
    _F32_MAX,
    -_F32_MAX,
    np.nextafter(_F32_MAX, math.inf),
    3.4028235677973366e38,  # rounds to float32's largest, but is beyond it
    1e308,
    -1e308,
    math.inf,
    -math.inf,
    math.nan,
    0.1,
    -2.5,
    1e20,
]


def _matrix_path(row: list[float]) -> np.ndarray | str:
    """What the matrix path makes of ``row``: its float32 model input, or its refusal reason."""
    try:
        matrix = feature_rows(predict_request([row]).inputs, len(row), LOOKBACK_PERIODS, 8)
    except InvalidArgument as exc:
        return exc.reason
    return model_input(matrix)


def _judge(row: list[float]) -> None:
    """``feature_values`` takes ``row`` only when the model would run on its values as they
    are (float32-rounded, nothing snapped), else leaves it to the matrix path."""
    values = feature_values(predict_request([row]).inputs[0].features.values, len(row))
    expected = _matrix_path(row)
    if values is None:
        # Refused, or its float32 input is not the plain rounding of its values (a snap).
        if not isinstance(expected, str):
            plain = np.array([row], dtype=np.float32)
            assert not (
                np.array_equal(plain, expected)
                and np.array_equal(np.signbit(plain), np.signbit(expected))
                and all(abs(v) > _TINY or (v == 0 and math.copysign(1, v) > 0) for v in row)
            ), row
        return
    assert not isinstance(expected, str), (row, expected)
    assert values == row and all(v.__class__ is float for v in values)
    taken = np.array([values], dtype=np.float32)
    np.testing.assert_array_equal(taken, expected)
    assert np.array_equal(np.signbit(taken), np.signbit(expected)), row


def test_feature_values_takes_a_row_only_as_the_model_would_run_on_it() -> None:
    base = [0.25, -1.0, 3.0, 7.5]
    for edge in EDGES:
        for at in range(len(base)):
            row = list(base)
            row[at] = float(edge)
            _judge(row)
    for a, b in itertools.product(EDGES, repeat=2):  # pairs: sums that overflow, NaN beside inf
        _judge([float(a), float(b), 1.0])
    taken = feature_values(predict_request([base]).inputs[0].features.values, 4)
    assert taken == base
    assert feature_values(predict_request([base]).inputs[0].features.values, 5) is None


def test_feature_values_against_the_matrix_path_on_random_rows() -> None:
    rng = np.random.default_rng(11)
    edges = np.array(EDGES, dtype=np.float64)
    taken = 0
    for _ in range(3000):
        row = rng.normal(scale=10.0 ** rng.integers(-40, 40), size=25)
        for at in rng.choice(25, size=rng.integers(0, 3), replace=False):
            row[at] = rng.choice(edges)
        values = row.tolist()
        _judge(values)
        taken += feature_values(predict_request([values]).inputs[0].features.values, 25) is not None
    assert 1000 < taken < 3000  # both paths were exercised


def test_apply_one_is_apply_bit_for_bit() -> None:
    rng = np.random.default_rng(5)
    p = np.concatenate(
        [
            rng.random(100_000),
            rng.random(2000) * 1e-6,
            1.0 - rng.random(2000) * 1e-6,
            [0.0, 1.0, 0.5, EPS, 1.0 - EPS, EPS / 2, math.nan],
        ]
    )
    for calibration in (
        {"method": "platt", "a": 1.2141296036896585, "b": 0.05354561793125548},
        {"method": "platt", "a": 0.7551689747738326, "b": -0.16485971095254429},
        {"method": "platt", "a": 37.0, "b": -12.5},
        {},
    ):
        batch = apply(calibration, p)
        one = np.array([apply_one(calibration, x) for x in p.tolist()])
        # Bit for bit, NaN included (its position and its bits).
        assert batch.tobytes() == one.tobytes(), calibration
        assert all(apply_one(calibration, x).__class__ is float for x in p[:10].tolist())


@pytest.fixture(scope="module", params=["lightgbm", "xgboost", "catboost"])
def pool(request, tmp_path_factory, candles):
    root = tmp_path_factory.mktemp(f"values-{request.param}")
    model_dir = write_model(root, "model_1", request.param, candles, trees=30)
    export_onnx(model_dir)
    pool = SessionPool((model_dir / "model.onnx").read_bytes(), size=2, threads=1)
    yield pool
    pool.close()


def test_predict_value_is_predict_proba_of_the_row_for_every_model_type(
    pool: SessionPool, feature_rows: np.ndarray
) -> None:
    assert pool.takes_values
    rows = np.asarray(feature_rows[:300], dtype=np.float64)
    answers = [pool.predict_value(row.tolist()) for row in rows]
    assert all(a.__class__ is float for a in answers)
    expected = pool.predict_proba(model_input(rows))
    assert np.array(answers).tobytes() == expected.tobytes()
    assert len(set(answers)) > 10


def _calibrated(model):
    """``model`` with a Platt calibration of its own (so the calibration step is exercised)."""
    meta = dataclasses.replace(model.meta, calibration={"method": "platt", "a": 1.37, "b": -0.21})
    return dataclasses.replace(model, meta=meta)


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_lone_row_gets_the_batched_answer_and_log_row_bit_for_bit(
    models_root, model, feature_rows, calibrated, tmp_path
) -> None:
    served = _calibrated(model) if calibrated else model
    rows = np.asarray(feature_rows[:40], dtype=np.float64)
    requests = [predict_request(rows[i : i + 1]) for i in range(len(rows))]

    async def alone() -> tuple[list[Result], list[Result], int]:
        predictor, logged = logged_predictor(models_root, served)
        answers = []
        for request in requests:
            answers.append(await predictor.predict(request))
            await asyncio.sleep(0)
        return answers, logged, predictor.lone_runs

    async def together() -> list[Result]:
        predictor, _ = logged_predictor(models_root, served)
        return list(await asyncio.gather(*(predictor.predict(r) for r in requests)))

    lone, logged, lone_runs = asyncio.run(alone())
    batched = asyncio.run(together())
    assert lone_runs == len(requests) and logged == lone
    for index, (a, b) in enumerate(zip(lone, batched, strict=True)):
        assert isinstance(a.rows, list) and isinstance(b.rows, list)  # values, no numpy
        # Both ran on what the matrix path makes of the row
        assert a.feature_matrix().tobytes() == model_input(rows[index : index + 1]).tobytes()
        assert a.feature_matrix().tobytes() == b.feature_matrix().tobytes()
        assert np.asarray(a.probabilities).tobytes() == np.asarray(b.probabilities).tobytes()
        assert (
            np.asarray(a.raw_probabilities).tobytes() == np.asarray(b.raw_probabilities).tobytes()
        )
        assert a.signals == b.signals and a.on_loop
    if calibrated:
        assert any(a.probabilities[0] != a.raw_probabilities[0] for a in lone)

    # The prediction log keeps the same row from the list as from the matrix.
    from_list, from_matrix = PredictionLog(None), PredictionLog(None)
    for a, b in zip(lone, batched, strict=True):
        meta = a.model.meta
        from_list.record(
            a.prediction_ids, a.rows, a.probabilities, a.signals, meta.name, meta.version
        )
        from_matrix.record(
            a.prediction_ids, b.feature_matrix()[:1], b.probabilities, b.signals, meta.name,
            meta.version,
        )  # fmt: skip
    for a in lone:
        got, expected = from_list.get(a.prediction_ids[0]), from_matrix.get(a.prediction_ids[0])
        assert got is not None and expected is not None
        assert got.features.dtype == np.float32
        assert got.features.tobytes() == expected.features.tobytes()
        assert (got.probability_up, got.signal) == (expected.probability_up, expected.signal)


def test_rows_the_fast_path_leaves_alone_take_the_matrix_path(
    models_root, model, feature_rows
) -> None:
    row = np.asarray(feature_rows[0], dtype=np.float64)
    zero, tiny, negative_zero = row.copy(), row.copy(), row.copy()
    zero[3], tiny[3], negative_zero[3] = 0.0, 1e-36, -0.0
    nan, short = row.copy(), row[:5]
    nan[7] = math.nan

    async def run() -> tuple[list[Result], list[str], int]:
        predictor, _ = logged_predictor(models_root, model)
        answers = []
        for given in (zero, tiny, negative_zero):
            answers.append(await predictor.predict(predict_request([given])))
            await asyncio.sleep(0)
        reasons = []
        for bad in (nan, short):
            with pytest.raises(InvalidArgument) as caught:
                await predictor.predict(predict_request([bad]))
            reasons.append(caught.value.reason)
        return answers, reasons, predictor.lone_runs

    answers, reasons, lone_runs = asyncio.run(run())
    assert reasons == ["NON_FINITE_FEATURE", "FEATURE_COUNT_MISMATCH"]
    assert lone_runs == 3
    # +0.0 is taken as it is; a tiny value and -0.0 are snapped by the matrix path.
    assert isinstance(answers[0].rows, list)
    assert all(isinstance(a.rows, np.ndarray) for a in answers[1:])
    for given, answer in zip((zero, tiny, negative_zero), answers, strict=True):
        matrix = model_input(given[None, :])
        assert answer.feature_matrix().tobytes() == matrix.tobytes()
        assert answer.raw_probabilities[0] == model.engine.predict_proba(matrix)[0]


def test_a_native_engine_takes_the_matrix_path(models_root, feature_rows) -> None:
    """The native booster has no one-value run (``takes_values`` False): a lone row is
    answered from the matrix, as before."""
    native = load_model(server_settings(models_root, onnx_enabled=False))
    try:
        assert native.engine.engine == "native" and not native.engine.takes_values
        served = dataclasses.replace(native, loop_max_rows=8)

        async def run() -> tuple[Result, int]:
            predictor, _ = logged_predictor(models_root, served)
            return await predictor.predict(predict_request(feature_rows[:1])), predictor.lone_runs

        answer, lone_runs = asyncio.run(run())
        assert lone_runs == 1 and isinstance(answer.rows, np.ndarray)
        matrix = model_input(np.asarray(feature_rows[:1], dtype=np.float64))
        assert answer.raw_probabilities[0] == native.engine.predict_proba(matrix)[0]
    finally:
        native.close()
