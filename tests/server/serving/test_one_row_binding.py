"""A lone row's inference through a bound input and output (``OneRow`` in
``xylen_server/serving/session_pool.py``): bit for bit the answers of onnxruntime's public
``run`` for every model type xylen exports, per thread without cross-talk, a fresh array each
time, and anything but one float32 row of the model's width left to ``run`` and its refusals."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from harness import write_model
from onnx import TensorProto, helper

from training.metadata import INPUT_NAME, PROBABILITIES_OUTPUT
from training.onnx_export import export_onnx
from xylen_server.serving.session_pool import OneRow, SessionPool


@pytest.fixture(scope="module", params=["lightgbm", "xgboost", "catboost"])
def pool(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    candles: dict[str, np.ndarray],
) -> SessionPool:
    root = tmp_path_factory.mktemp(f"one-row-{request.param}")
    model_dir = write_model(root, "model_1", request.param, candles, trees=30)
    export_onnx(model_dir)
    return SessionPool((model_dir / "model.onnx").read_bytes(), size=2, threads=1)


def _public(pool: SessionPool, rows: np.ndarray) -> np.ndarray:
    """P(up) by onnxruntime's public API, as float64."""
    answer = pool._session.run([PROBABILITIES_OUTPUT], {INPUT_NAME: rows})[0]
    return np.asarray(answer[:, 1], dtype=np.float64)


def _rows(feature_rows: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(feature_rows[:n], dtype=np.float32)


def test_every_model_type_gets_the_bound_run_with_run_s_answers_bit_for_bit(
    pool: SessionPool, feature_rows: np.ndarray
) -> None:
    assert pool._one_row is not None
    assert pool._one_row.shape == (1, feature_rows.shape[1])
    rows = _rows(feature_rows, 300)
    answers = [pool.predict_proba(rows[i : i + 1]) for i in range(len(rows))]
    assert all(a.dtype == np.float64 and a.shape == (1,) for a in answers)
    np.testing.assert_array_equal(
        np.concatenate(answers),
        np.concatenate([_public(pool, rows[i : i + 1]) for i in range(300)]),
    )
    assert len({float(a[0]) for a in answers}) > 10  # the rows really differ: not one answer
    # The loop's name for the same method, and a batch, agree with it.
    np.testing.assert_array_equal(pool.predict_on_loop(rows[5:6]), answers[5])
    np.testing.assert_array_equal(pool.predict_proba(rows[:7]), np.concatenate(answers[:7]))


def test_an_answer_is_a_new_array_not_the_bound_buffer(
    pool: SessionPool, feature_rows: np.ndarray
) -> None:
    rows = _rows(feature_rows, 200)
    first = pool.predict_proba(rows[:1])
    kept = first.copy()
    other = next(i for i in range(1, 200) if _public(pool, rows[i : i + 1])[0] != kept[0])
    second = pool.predict_proba(rows[other : other + 1])
    assert second[0] != kept[0]
    np.testing.assert_array_equal(first, kept)  # the next run did not write into it


def test_threads_each_run_their_own_rows_without_cross_talk(
    pool: SessionPool, feature_rows: np.ndarray
) -> None:
    rows = _rows(feature_rows, 400)
    expected = np.concatenate([_public(pool, rows[i : i + 1]) for i in range(len(rows))])
    threads = 4
    start = threading.Barrier(threads)
    got: dict[int, list[tuple[int, float]]] = {}
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            start.wait()
            mine = []
            for _ in range(3):
                for i in range(offset, len(rows), threads):
                    mine.append((i, float(pool.predict_proba(rows[i : i + 1])[0])))
            got[offset] = mine
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors
    checked = 0
    for mine in got.values():
        for i, value in mine:
            assert value == expected[i]
            checked += 1
    assert checked == 3 * len(rows)


def test_other_inputs_meet_run_s_own_refusal(pool: SessionPool, feature_rows: np.ndarray) -> None:
    width = feature_rows.shape[1]
    for wrong in (
        np.zeros((1, 3), dtype=np.float32),  # another width
        np.zeros((1, width), dtype=np.float64),  # another type
    ):
        with pytest.raises(Exception) as ours:
            pool.predict_proba(wrong)
        with pytest.raises(Exception) as theirs:
            pool._session.run([PROBABILITIES_OUTPUT], {INPUT_NAME: wrong})
        assert type(ours.value) is type(theirs.value)
        assert str(ours.value) == str(theirs.value)


def test_a_model_without_a_fixed_width_or_float_probabilities_is_not_bound(tmp_path: Path) -> None:
    def session(width: int | None, out_type: int) -> ort.InferenceSession:
        graph = helper.make_graph(
            [helper.make_node("Cast", [INPUT_NAME], [PROBABILITIES_OUTPUT], to=out_type)],
            "g",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", width])],
            [helper.make_tensor_value_info(PROBABILITIES_OUTPUT, out_type, ["N", width])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    assert OneRow.of(session(2, TensorProto.FLOAT)) is not None  # the shape xylen exports
    assert OneRow.of(session(None, TensorProto.FLOAT)) is None  # no fixed width
    assert OneRow.of(session(2, TensorProto.DOUBLE)) is None  # not float32
    assert OneRow.of(session(3, TensorProto.FLOAT)) is None  # not two columns
