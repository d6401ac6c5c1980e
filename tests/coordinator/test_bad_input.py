"""Bad input to every coordinator RPC gets a proper status naming the problem, with a bounded
message: never INTERNAL or UNKNOWN, never an outcome acknowledged that a model server would
refuse later. A real coordinator process in front of a real (scripted) model server."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import harness
import pytest
from coordinator.coordinator_process import CoordinatorProcess
from coordinator.helpers import endpoint, write_config
from coordinator.lying_model_server import LyingModelServer
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator.featurize import FEATURES_HASH

PROPER = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}


@pytest.fixture
def coordinator(
    tmp_path: Path,
    coordinator_factory: Callable[[Path], CoordinatorProcess],
) -> Iterator[CoordinatorProcess]:
    # The server reports the coordinator's feature definitions, so windows are featurized in
    # the coordinator (its own bad-window path is exercised).
    server = LyingModelServer("model_1", features_hash=FEATURES_HASH)
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint("model_1", server.port, 1.0)],
        retraining={"feedback_delay_seconds": 3600},
    )
    process = coordinator_factory(config)
    yield process
    process.stop()
    server.close()


def _refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    reason = ""
    if status is not None:
        for detail in status.details:
            errinfo = error_details_pb2.ErrorInfo()
            if detail.Unpack(errinfo):
                reason = errinfo.reason
    return error.code(), error.details(), reason  # type: ignore[attr-defined]


def _stamp(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def test_every_bad_input_gets_a_proper_status_with_a_bounded_message(
    coordinator: CoordinatorProcess,
) -> None:
    stub = coordinator.stub
    window = harness.window_input(harness.synthetic_candles(200, seed=3), 150)
    predicted = stub.Predict(epb.EnsembleServicePredictRequest(inputs=[window]), timeout=10)
    pid = predicted.predictions[0].prediction_id
    now = int(datetime.now(UTC).timestamp())

    def feedback(prediction_id: str = pid, **outcome: object) -> Callable[[], object]:
        fields: dict[str, object] = {
            "realized_return": 0.01,
            "underlying_log_return": 0.01,
            "close_time": _stamp(now),
        }
        fields.update(outcome)
        request = epb.EnsembleServiceFeedbackRequest(
            prediction_id=prediction_id, outcome=pb.TradeOutcome(**fields)
        )
        return lambda: stub.Feedback(request, timeout=10)

    def predict(
        inputs: list[pb.PredictInput], timeout: duration_pb2.Duration | None = None
    ) -> Callable[[], object]:
        request = epb.EnsembleServicePredictRequest(inputs=inputs, timeout=timeout)
        return lambda: stub.Predict(request)  # no client deadline: the coordinator's own

    nan_window = pb.PredictInput()
    nan_window.CopyFrom(window)
    nan_window.candles.candles[-1].close = math.nan
    cases: dict[str, tuple[Callable[[], object], str]] = {
        "close_time 2^62 s": (feedback(close_time=_stamp(2**62)), "OUTCOME_IN_FUTURE"),
        "close_time -2^62 s": (feedback(close_time=_stamp(-(2**62))), "INVALID_OUTCOME"),
        "close_time after 9999": (feedback(close_time=_stamp(253_402_300_800)), ""),
        "close_time nanos -1": (feedback(close_time=_stamp(now, -1)), "INVALID_OUTCOME"),
        "close_time nanos 2e9": (feedback(close_time=_stamp(now, 2 * 10**9)), "INVALID_OUTCOME"),
        "close_time 1970": (feedback(close_time=_stamp(0)), "INVALID_OUTCOME"),
        "close_time in an hour": (feedback(close_time=_stamp(now + 3600)), "OUTCOME_IN_FUTURE"),
        "close_time before the prediction": (
            feedback(close_time=_stamp(now - 3600)),
            "INVALID_OUTCOME",
        ),
        "no close_time": (
            lambda: stub.Feedback(
                epb.EnsembleServiceFeedbackRequest(
                    prediction_id=pid, outcome=pb.TradeOutcome(realized_return=0.01)
                ),
                timeout=10,
            ),
            "INVALID_OUTCOME",
        ),
        "pnl inf": (feedback(pnl=math.inf), "INVALID_OUTCOME"),
        "realized_return nan": (feedback(realized_return=math.nan), "INVALID_OUTCOME"),
        "no outcome": (
            lambda: stub.Feedback(
                epb.EnsembleServiceFeedbackRequest(prediction_id=pid), timeout=10
            ),
            "INVALID_OUTCOME",
        ),
        "no prediction id": (feedback(""), "MISSING_PREDICTION_ID"),
        "1 MiB prediction id": (feedback("x" * 2**20), "PREDICTION_ID_TOO_LONG"),
        "unknown 128-byte id": (feedback("y" * 128), "PREDICTION_NOT_FOUND"),
        "empty batch": (predict([]), "EMPTY_BATCH"),
        "5000 inputs": (predict([harness.feature_input([0.0] * 25)] * 5000), "BATCH_TOO_LARGE"),
        "timeout 2^40 s": (
            predict([window], duration_pb2.Duration(seconds=2**40)),
            "INVALID_TIMEOUT",
        ),
        "timeout nanos 2e9": (
            predict([window], duration_pb2.Duration(seconds=1, nanos=2 * 10**9)),
            "INVALID_TIMEOUT",
        ),
        "timeout of mixed signs": (
            predict([window], duration_pb2.Duration(seconds=1, nanos=-5)),
            "INVALID_TIMEOUT",
        ),
        "short window": (
            predict([harness.window_input(harness.synthetic_candles(200), 150, 10)]),
            "WINDOW_TOO_SHORT",
        ),
        "NaN close in a window": (predict([nan_window]), ""),
    }
    improper = {}
    for name, (call, reason) in cases.items():
        code, message, got = _refusal(call)
        if code not in PROPER or (reason and got != reason) or len(message) > 512:
            improper[name] = (code, got, message[:200])
    assert improper == {}
    # Nothing above was queued, and the good outcome is still accepted once.
    assert (
        stub.Feedback(
            epb.EnsembleServiceFeedbackRequest(
                prediction_id=pid,
                outcome=pb.TradeOutcome(
                    realized_return=0.01, underlying_log_return=0.01, close_time=_stamp(now)
                ),
            ),
            timeout=10,
        ).duplicate
        is False
    )
    info = stub.GetEnsembleInfo(epb.GetEnsembleInfoRequest(), timeout=10)
    assert info.pending_feedback == 1
    log = coordinator.log()
    assert "Traceback" not in log
    assert "x" * 1000 not in log


def test_undecodable_bytes_are_invalid_argument_without_a_traceback(
    coordinator: CoordinatorProcess,
) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
    try:
        for method in ("Predict", "Feedback", "GetEnsembleInfo"):
            raw = channel.unary_unary(
                f"/xylen.v1.EnsembleService/{method}",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            for garbage in (b"\xff\xff\xff\x0f\x01", b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 1000):
                code, message, reason = _refusal(lambda r=raw, g=garbage: r(g, timeout=10))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, message)
                assert reason == "UNDECODABLE_REQUEST" and len(message) < 200
    finally:
        channel.close()
    window = harness.window_input(harness.synthetic_candles(200, seed=3), 150)
    answer = coordinator.stub.Predict(
        epb.EnsembleServicePredictRequest(inputs=[window]), timeout=10
    )
    assert len(answer.predictions[0].votes) == 1
    log = coordinator.log()
    assert "Traceback" not in log and "DecodeError" not in log
    assert log.count("undecodable request refused") == 1  # the first; then every 1000th
