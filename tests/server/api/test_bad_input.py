"""What bad input gets: undecodable bytes, fields over their limits, timestamps out of range.

Every case goes to a live server over loopback and checks the status code, the ErrorInfo
reason, that the message stays short (no echo of the caller's text) and, for undecodable
bytes, that the log holds no traceback and a counter went up instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from errorinfo import error_info
from harness import InProcessServer, feature_input, server_settings, window_input

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2

PREDICT = "/xylen.v1.ModelService/Predict"
UNARY_METHODS = [
    PREDICT,
    "/xylen.v1.ModelService/Feedback",
    "/xylen.v1.ModelService/Retrain",
    "/xylen.v1.ModelService/GetModelInfo",
    "/xylen.v1.ModelService/ListModelVersions",
    "/xylen.v1.ModelService/RollbackModel",
    "/xylen.v1.ModelService/ReloadModel",
    "/grpc.health.v1.Health/Check",
]
GARBAGE = [b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab", b"\x08" + b"\x80" * 11]
LONG = "x" * 100_000
#: An error message quoting the caller's text in full would be longer than this.
SHORT = 400


@pytest.fixture(scope="module")
def server(
    models_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    """This module's own server, with its own feedback store (the shared default directory may
    be held by another test's server process)."""
    data = tmp_path_factory.mktemp("bad-input-data")
    running = InProcessServer(server_settings(models_root, feedback_data_dir=data))
    yield running
    running.close()


@pytest.fixture(scope="module")
def channel(server: InProcessServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.ModelServiceStub:
    return pb_grpc.ModelServiceStub(channel)


def _refusal(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=10, **kwargs)
    error = caught.value
    assert len(error.details() or "") < SHORT, error.details()
    return error


def _assert_refused(error: grpc.RpcError, code: grpc.StatusCode, reason: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    assert error_info(error).reason == reason


def test_undecodable_bytes_get_invalid_argument_a_counter_and_no_traceback(server, channel, caplog):
    recorder = server.running.recorder
    before = recorder.events("undecodable")
    tried = 0
    with caplog.at_level(logging.DEBUG):
        for method in UNARY_METHODS:
            call = channel.unary_unary(method)  # identity serializers: raw bytes
            for data in GARBAGE:
                error = _refusal(call, data)
                _assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "UNDECODABLE_REQUEST")
                tried += 1
        stream = channel.stream_stream("/xylen.v1.ModelService/PredictStream")
        for data in GARBAGE:
            with pytest.raises(grpc.RpcError) as caught:
                list(stream(iter([data]), timeout=10))
            _assert_refused(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "UNDECODABLE_REQUEST")
            tried += 1
        watch = channel.unary_stream("/xylen.v1.ModelService/WatchRetrain")
        with pytest.raises(grpc.RpcError) as caught:
            list(watch(GARBAGE[0], timeout=10))
        _assert_refused(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "UNDECODABLE_REQUEST")
        tried += 1
    assert recorder.events("undecodable") - before == tried
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_long_names_and_ids_are_refused_without_echo(stub):
    for call, request in [
        (stub.Predict, pb.PredictRequest(model_name=LONG)),
        (stub.GetModelInfo, pb.GetModelInfoRequest(model_name=LONG)),
        (stub.ListModelVersions, pb.ListModelVersionsRequest(model_name=LONG)),
    ]:
        error = _refusal(call, request)
        _assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "NAME_TOO_LONG")
        assert "MAX_NAME_BYTES" in error.details()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.WatchRetrain(pb.WatchRetrainRequest(job_id=LONG), timeout=10))
    _assert_refused(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "NAME_TOO_LONG")

    error = _refusal(stub.Feedback, pb.FeedbackRequest(prediction_id=LONG))
    _assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "PREDICTION_ID_TOO_LONG")
    # a name within the limit but not served: NOT_FOUND, quoting a short prefix only
    error = _refusal(stub.GetModelInfo, pb.GetModelInfoRequest(model_name="y" * 120))
    _assert_refused(error, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert "y" * 100 not in error.details()


def test_a_window_over_the_candle_limit_is_refused_before_featurising(stub, server, candles):
    limit = server.settings.max_window_candles
    too_long = window_input(candles, limit + 150, limit + 1)
    error = _refusal(stub.Predict, pb.PredictRequest(inputs=[too_long]))
    _assert_refused(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "WINDOW_TOO_LONG")
    assert "MAX_WINDOW_CANDLES" in error.details()
    # at the limit it is served
    answer = stub.Predict(pb.PredictRequest(inputs=[window_input(candles, limit + 150, limit)]))
    assert len(answer.predictions) == 1


def test_rows_over_the_batch_limit(stub, server, feature_rows):
    limit = server.settings.max_batch_rows
    rows = [feature_input(feature_rows[0])] * (limit + 1)
    error = _refusal(stub.Predict, pb.PredictRequest(inputs=rows))
    _assert_refused(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "BATCH_TOO_LARGE")


BAD_STAMPS = [(2**62, 0), (-(2**62), 0), (0, -1), (0, 1_000_000_000), (253_402_300_800, 0)]


@pytest.mark.parametrize(("seconds", "nanos"), BAD_STAMPS)
def test_candle_timestamps_out_of_range(stub, candles, seconds, nanos):
    row = window_input(candles, 400)
    row.candles.candles[50].open_time.seconds = seconds
    row.candles.candles[50].open_time.nanos = nanos
    error = _refusal(stub.Predict, pb.PredictRequest(inputs=[row]))
    _assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TIMESTAMP")
    assert error_info(error).metadata["candle"] == "50"


@pytest.mark.parametrize(("seconds", "nanos"), BAD_STAMPS)
def test_feedback_close_times_out_of_range(stub, feature_rows, seconds, nanos):
    request = pb.FeedbackRequest(
        prediction_id="p-1",
        outcome=pb.TradeOutcome(pnl=1.0, realized_return=0.01),
        features=types_pb2.FeatureVector(values=[float(v) for v in feature_rows[0]]),
    )
    request.outcome.close_time.seconds = seconds
    request.outcome.close_time.nanos = nanos
    error = _refusal(stub.Feedback, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason in ("INVALID_OUTCOME", "OUTCOME_IN_FUTURE")


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_feedback_refuses_what_predict_refuses(stub, feature_rows, value):
    values = [float(v) for v in feature_rows[0]]
    values[3] = value
    error = _refusal(stub.Predict, pb.PredictRequest(inputs=[feature_input(values)]))
    _assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "NON_FINITE_FEATURE")
    request = pb.FeedbackRequest(
        prediction_id="p-2",
        outcome=pb.TradeOutcome(pnl=1.0, realized_return=0.01),
        features=types_pb2.FeatureVector(values=values),
    )
    request.outcome.close_time.GetCurrentTime()
    error = _refusal(stub.Feedback, request)
    _assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "NON_FINITE_FEATURE")
    for field in ("pnl", "realized_return"):
        request = pb.FeedbackRequest(prediction_id="p-3", outcome=pb.TradeOutcome(pnl=1.0))
        setattr(request.outcome, field, value)
        request.outcome.close_time.GetCurrentTime()
        request.features.values.extend(float(v) for v in feature_rows[0])
        error = _refusal(stub.Feedback, request)
        _assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OUTCOME")


def test_stream_items_over_their_limits_are_answered_in_the_stream(stub, feature_rows):
    good = pb.PredictRequest(inputs=[feature_input(feature_rows[0])])
    items = [
        pb.PredictStreamRequest(request_id=LONG, request=good),
        pb.PredictStreamRequest(request_id="bad-timeout", request=good),
        pb.PredictStreamRequest(request_id="negative", request=good),
        pb.PredictStreamRequest(request_id="name", request=pb.PredictRequest(model_name=LONG)),
        pb.PredictStreamRequest(request_id="ok", request=good),
    ]
    items[1].timeout.seconds, items[1].timeout.nanos = 2**62, 0
    items[2].timeout.seconds = -5
    answers = list(stub.PredictStream(iter(items), timeout=10))
    by_id = {a.request_id: a for a in answers}
    assert len(answers) == 5
    assert by_id[""].status.reason == "REQUEST_ID_TOO_LONG"  # the long id is not echoed
    assert by_id[""].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_id["bad-timeout"].status.reason == "INVALID_TIMEOUT"
    assert by_id["negative"].status.reason == "INVALID_TIMEOUT"
    assert by_id["name"].status.reason == "NAME_TOO_LONG"
    assert by_id["ok"].status.code == 0
    assert all(len(a.status.message) < SHORT for a in answers)
