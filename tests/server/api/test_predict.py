"""Predict over real gRPC against a real model: by features, by candles, and every refusal."""

from __future__ import annotations

import math

import grpc
import lightgbm as lgb
import numpy as np
import pytest
from errorinfo import error_info
from harness import candle_proto, feature_input, window_input

from training import features
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2


def native_probabilities(models_root, rows: np.ndarray) -> np.ndarray:
    booster = lgb.Booster(model_file=str(models_root / "model_1" / "lightgbm_model.txt"))
    return booster.predict(rows.astype(np.float32))


def test_predict_by_features_matches_the_native_model(stub, models_root, feature_rows):
    rows = feature_rows[:50]
    response = stub.Predict(pb.PredictRequest(inputs=[feature_input(r) for r in rows]))

    got = np.array([p.probability_up for p in response.predictions])
    np.testing.assert_allclose(got, native_probabilities(models_root, rows), atol=1e-5)
    assert len({p.prediction_id for p in response.predictions}) == len(rows)
    assert {(p.model_name, p.model_version) for p in response.predictions} == {("model_1", 1)}
    assert response.inference_duration.ToNanoseconds() > 0


def test_signals_follow_the_thresholds(stub, feature_rows):
    response = stub.Predict(
        pb.PredictRequest(inputs=[feature_input(r) for r in feature_rows[:300]])
    )
    for p in response.predictions:
        if p.probability_up >= 0.55:
            assert p.signal == types_pb2.SIGNAL_BUY
        elif p.probability_up <= 0.45:
            assert p.signal == types_pb2.SIGNAL_SELL
        else:
            assert p.signal == types_pb2.SIGNAL_HOLD
    assert len({p.signal for p in response.predictions}) >= 2


def test_predict_by_candles_equals_predict_by_offline_features(stub, candles):
    offline = features.compute_features(candles)
    ends = [150, 777, 2500]
    by_candles = stub.Predict(pb.PredictRequest(inputs=[window_input(candles, e) for e in ends]))
    by_features = stub.Predict(pb.PredictRequest(inputs=[feature_input(offline[e]) for e in ends]))
    assert [p.probability_up for p in by_candles.predictions] == [
        p.probability_up for p in by_features.predictions
    ]


def test_a_longer_window_uses_its_last_lookback_candles(stub, candles):
    short = stub.Predict(pb.PredictRequest(inputs=[window_input(candles, 900)]))
    long = stub.Predict(pb.PredictRequest(inputs=[window_input(candles, 900, length=400)]))
    assert short.predictions[0].probability_up == long.predictions[0].probability_up


def test_a_batch_may_mix_features_and_candles(stub, candles, feature_rows):
    request = pb.PredictRequest(
        inputs=[
            feature_input(feature_rows[0]),
            window_input(candles, 1000),
            feature_input(feature_rows[1]),
        ]
    )
    assert len(stub.Predict(request).predictions) == 3


def test_model_name_selects_the_served_model(stub, feature_rows):
    request = pb.PredictRequest(model_name="model_1", inputs=[feature_input(feature_rows[0])])
    assert stub.Predict(request).predictions[0].model_name == "model_1"


def _window(candles, end, mutate):
    item = window_input(candles, end)
    mutate(item.candles.candles)
    return pb.PredictRequest(inputs=[item])


def _swap(cs, i, j):
    a, b = types_pb2.Candle(), types_pb2.Candle()
    a.CopyFrom(cs[i])
    b.CopyFrom(cs[j])
    cs[i].CopyFrom(b)
    cs[j].CopyFrom(a)


BAD_REQUESTS = {
    "wrong feature count": (
        lambda c, f: pb.PredictRequest(inputs=[feature_input(f[0][:-1])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "FEATURE_COUNT_MISMATCH",
    ),
    "NaN feature": (
        lambda c, f: pb.PredictRequest(inputs=[feature_input(np.r_[f[0][:-1], np.nan])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NON_FINITE_FEATURE",
    ),
    "infinite feature": (
        lambda c, f: pb.PredictRequest(
            inputs=[feature_input(f[1]), feature_input(np.r_[math.inf, f[0][1:]])]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NON_FINITE_FEATURE",
    ),
    "feature beyond float32": (
        lambda c, f: pb.PredictRequest(inputs=[feature_input([1e300, *f[0][1:].tolist()])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "FEATURE_OUT_OF_RANGE",
    ),
    "empty batch": (
        lambda c, f: pb.PredictRequest(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EMPTY_BATCH",
    ),
    "row with no input": (
        lambda c, f: pb.PredictRequest(inputs=[pb.PredictInput()]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "MISSING_INPUT",
    ),
    "window shorter than the lookback": (
        lambda c, f: pb.PredictRequest(
            inputs=[window_input(c, 500, length=features.LOOKBACK_PERIODS - 1)]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WINDOW_TOO_SHORT",
    ),
    "candles out of order": (
        lambda c, f: _window(c, 500, lambda cs: _swap(cs, 10, 11)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CANDLES_OUT_OF_ORDER",
    ),
    "duplicated candle": (
        lambda c, f: _window(c, 500, lambda cs: cs[20].CopyFrom(cs[19])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CANDLES_DUPLICATED",
    ),
    "candle without open_time": (
        lambda c, f: _window(c, 500, lambda cs: cs[5].ClearField("open_time")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "MISSING_OPEN_TIME",
    ),
    "NaN close": (
        lambda c, f: _window(c, 500, lambda cs: setattr(cs[-1], "close", math.nan)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NON_FINITE_CANDLE",
    ),
    "high below low": (
        lambda c, f: _window(c, 500, lambda cs: setattr(cs[-3], "high", cs[-3].low / 2)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CANDLE",
    ),
    "taker volume above volume": (
        lambda c, f: _window(
            c, 500, lambda cs: setattr(cs[-2], "taker_buy_base_volume", cs[-2].volume * 2 + 1)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CANDLE",
    ),
    "unknown model": (
        lambda c, f: pb.PredictRequest(model_name="model_9", inputs=[feature_input(f[0])]),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    ),
    "batch above the limit": (
        lambda c, f: pb.PredictRequest(inputs=[feature_input(f[0])] * 4097),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "BATCH_TOO_LARGE",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_its_code_and_reason_and_the_server_keeps_serving(
    stub, candles, feature_rows, case
):
    build, code, reason = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(build(candles, feature_rows))
    assert caught.value.code() == code
    info = error_info(caught.value)
    assert info.reason == reason
    assert info.domain == "xylen.dev"
    assert caught.value.details()  # a message that names the problem
    assert (
        len(stub.Predict(pb.PredictRequest(inputs=[feature_input(feature_rows[0])])).predictions)
        == 1
    )


def test_error_metadata_points_at_the_row(stub, feature_rows):
    request = pb.PredictRequest(
        inputs=[feature_input(feature_rows[0]), feature_input(feature_rows[1][:5])]
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request)
    info = error_info(caught.value)
    assert dict(info.metadata) == {
        "row": "1",
        "expected": str(len(features.FEATURE_NAMES)),
        "got": "5",
    }
    assert "row 1" in caught.value.details()


def test_a_candle_window_error_names_the_candle(stub, candles):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(_window(candles, 500, lambda cs: cs[30].CopyFrom(cs[29])))
    assert error_info(caught.value).metadata["candle"] == "30"


def test_candle_proto_round_trips_open_time(candles):
    assert candle_proto(candles, 3).open_time.ToMilliseconds() == int(candles["open_time"][3])


def test_get_model_info_describes_the_model(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest()).model_info
    assert info.name == "model_1"
    assert info.model_type == pb.MODEL_TYPE_LIGHTGBM
    assert info.version == 1
    assert list(info.feature_names) == list(features.FEATURE_NAMES)
    assert info.lookback == features.LOOKBACK_PERIODS
    assert info.engine == pb.ENGINE_ONNX
    assert info.training_samples > 1000
    assert info.train_time.ToJsonString() == "2026-11-30T00:00:00Z"
    assert info.features_hash == features.feature_definitions_hash()
    assert info.training_status.state == pb.TRAINING_STATE_IDLE
    assert (info.sell_threshold, info.buy_threshold) == (0.45, 0.55)


def test_get_model_info_for_another_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModelInfo(pb.GetModelInfoRequest(model_name="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "MODEL_NOT_FOUND"
