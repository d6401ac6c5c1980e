"""A server whose answer cannot be trusted (a probability that is NaN, infinite or outside
[0, 1], another model's name, a version it never reported) is a missing vote with its reason,
in the response, the log and the counters; it never fails the ensemble call nor moves its
decision. Real gRPC servers on loopback: two honest ones and one that lies."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from coordinator.coordinator_process import CoordinatorProcess
from coordinator.helpers import endpoint, write_config
from coordinator.lying_model_server import LyingModelServer
from coordinator.recording_model_server import RecordingModelServer

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_coordinator import Coordinator, MissingReason
from xylen_coordinator.trust import check_answer

#: (what the liar is made to say, the reason its vote is rejected for)
LIES: list[tuple[str, dict[str, object], str]] = [
    ("NaN", {"probability": math.nan}, "PROBABILITY_OUT_OF_RANGE"),
    ("+inf", {"probability": math.inf}, "PROBABILITY_OUT_OF_RANGE"),
    ("-inf", {"probability": -math.inf}, "PROBABILITY_OUT_OF_RANGE"),
    ("1.5", {"probability": 1.5}, "PROBABILITY_OUT_OF_RANGE"),
    ("-0.25", {"probability": -0.25}, "PROBABILITY_OUT_OF_RANGE"),
    ("another model's name", {"model_name": "model_a"}, "WRONG_MODEL_NAME"),
    ("a version it never reported", {"model_version": 7}, "UNKNOWN_MODEL_VERSION"),
    ("version 0", {"model_version": 0}, "UNKNOWN_MODEL_VERSION"),
    ("an absurd version", {"model_version": 2**62}, "UNKNOWN_MODEL_VERSION"),
    ("a 1 MiB prediction id", {"id_padding": "x" * 2**20}, "PREDICTION_ID_TOO_LONG"),
]


@pytest.fixture
def servers() -> Iterator[tuple[RecordingModelServer, RecordingModelServer, LyingModelServer]]:
    a, b = RecordingModelServer("model_a", 0.8), RecordingModelServer("model_b", 0.6)
    liar = LyingModelServer("liar")
    yield a, b, liar
    for server in (a, b, liar):
        server.close()


def _input() -> list[pb.PredictInput]:
    return [pb.PredictInput(features=types_pb2.FeatureVector(values=[0.0] * 3))]


def test_each_lie_is_a_rejected_vote_over_grpc_in_the_response_log_and_counters(
    servers: tuple[RecordingModelServer, RecordingModelServer, LyingModelServer],
    coordinator_factory: Callable[[Path], CoordinatorProcess],
    tmp_path: Path,
) -> None:
    a, b, liar = servers
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint("model_a", a.port, 1.0), endpoint("model_b", b.port, 1.0),
         endpoint("liar", liar.port, 1.0)],
    )  # fmt: skip
    coordinator = coordinator_factory(config)
    request = epb.EnsembleServicePredictRequest(inputs=_input())
    # The liar is honest first: three votes (its GetModelInfo told the coordinator its name).
    deadline = time.monotonic() + 20
    while True:
        honest = coordinator.stub.Predict(request, timeout=10)
        if len(honest.predictions[0].votes) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [v.server_name for v in honest.predictions[0].votes] == ["model_a", "model_b", "liar"]
    assert liar.info_calls >= 1
    for label, lie, reason in LIES:
        liar.tell_the_truth()
        for field, value in lie.items():
            setattr(liar, field, value)
        response = coordinator.stub.Predict(request, timeout=10)  # never an error status
        votes = response.predictions[0].votes
        assert [v.server_name for v in votes] == ["model_a", "model_b"], label
        # The decision is the honest servers' alone: (0.8 + 0.6) / 2.
        assert response.predictions[0].probability_up == pytest.approx(0.7), label
        (missing,) = response.missing_votes
        assert missing.server_name == "liar", label
        assert missing.reason == epb.MISSING_REASON_REJECTED, label
        assert missing.error_reason == reason, label
        assert len(missing.message) < 300, label
    liar.tell_the_truth()
    again = coordinator.stub.Predict(request, timeout=10)
    assert [v.server_name for v in again.predictions[0].votes] == ["model_a", "model_b", "liar"]
    info = coordinator.stub.GetEnsembleInfo(epb.GetEnsembleInfoRequest(), timeout=10)
    counters = {e.name: e.counters for e in info.endpoints}
    assert counters["liar"].missing_votes["REJECTED"] == len(LIES)
    assert dict(counters["liar"].rejected_votes) == {
        "PROBABILITY_OUT_OF_RANGE": 5,
        "WRONG_MODEL_NAME": 1,
        "UNKNOWN_MODEL_VERSION": 3,
        "PREDICTION_ID_TOO_LONG": 1,
    }
    assert counters["liar"].votes >= 2 and counters["model_a"].votes >= len(LIES) + 2
    assert dict(counters["model_a"].missing_votes) == {}
    log = coordinator.log()
    reasons = ("PROBABILITY_OUT_OF_RANGE", "WRONG_MODEL_NAME", "UNKNOWN_MODEL_VERSION",
               "PREDICTION_ID_TOO_LONG")  # fmt: skip
    for reason in reasons:
        assert f"vote of liar rejected, {reason}" in log
    # Five probability lies in a row make one log line, not five (a liar cannot fill the log).
    assert log.count("vote of liar rejected, PROBABILITY_OUT_OF_RANGE") == 1
    assert coordinator.stop() == 0


def test_a_lying_server_alone_with_the_quorum_is_no_quorum_not_internal(
    servers: tuple[RecordingModelServer, RecordingModelServer, LyingModelServer],
    tmp_path: Path,
) -> None:
    """When the liar's vote is needed for the quorum, the call is UNAVAILABLE NO_QUORUM naming
    why it is missing, never INTERNAL."""
    _, _, liar = servers
    liar.probability = math.nan
    config = write_config(tmp_path / "config.yaml", [endpoint("liar", liar.port, 1.0)])
    with Coordinator(config) as coordinator:
        assert coordinator.wait_serving(timeout=10)
        from xylen_server.errors import Unavailable

        with pytest.raises(Unavailable) as info:
            coordinator.predict(_input())
        assert info.value.reason == "NO_QUORUM"
        assert "PROBABILITY_OUT_OF_RANGE" in info.value.message or "nan" in info.value.message


def test_configured_model_name_is_checked_and_a_swap_to_a_reported_version_is_accepted(
    servers: tuple[RecordingModelServer, RecordingModelServer, LyingModelServer],
    tmp_path: Path,
) -> None:
    a, b, liar = servers
    endpoints = [
        {**endpoint("model_a", a.port, 1.0), "model_name": "model_a"},
        # model_b's server answers "model_b": configured to serve "model_x", it is not trusted.
        {**endpoint("model_b", b.port, 1.0), "model_name": "model_x"},
        endpoint("liar", liar.port, 1.0),
    ]
    config = write_config(tmp_path / "config.yaml", endpoints, quorum={"min_weight_fraction": 0.3})
    with Coordinator(config) as coordinator:
        assert coordinator.wait_serving(timeout=10)
        deadline = time.monotonic() + 10
        while not liar.info_calls and time.monotonic() < deadline:
            time.sleep(0.02)
        result = coordinator.predict(_input())
        assert result.voters == ("model_a", "liar")
        (missing,) = result.missing
        assert missing.reason is MissingReason.REJECTED
        assert missing.error_reason == "WRONG_MODEL_NAME"
        assert "'model_b'" in missing.message and "'model_x'" in missing.message
        # A hot swap: the server now serves and reports version 2. Its first v2 votes may be
        # rejected until GetModelInfo confirms the version; then they count.
        liar.info_version = liar.model_version = 2
        verdicts = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            result = coordinator.predict(_input())
            verdicts.append(result.voters)
            if "liar" in result.voters:
                break
            assert result.missing[-1].error_reason == "UNKNOWN_MODEL_VERSION"
            time.sleep(0.05)
        assert "liar" in verdicts[-1]
        vote = next(v for v in result.decision.votes if v.server_name == "liar")
        assert vote.model_version == 2
        # Answers from version 1 (in flight across the swap) still count: it was reported.
        liar.model_version = 1
        assert "liar" in coordinator.predict(_input()).voters
        states = {s.name: s for s in coordinator.endpoints()}
        assert states["model_b"].counts is not None
        calls = 1 + len(verdicts) + 1
        assert states["model_b"].counts.rejected == {"WRONG_MODEL_NAME": calls}
        assert states["model_b"].counts.votes == 0


def test_check_answer_names_the_first_untrusted_row() -> None:
    good = pb.Prediction(probability_up=0.5, model_name="m", model_version=3)
    bad = pb.Prediction(probability_up=float("nan"), model_name="m", model_version=3)
    assert check_answer(pb.PredictResponse(predictions=[good, good]), "m", {3}) is None
    rejection = check_answer(pb.PredictResponse(predictions=[good, bad]), "m", {3})
    assert rejection is not None and rejection.reason == "PROBABILITY_OUT_OF_RANGE"
    assert rejection.message.startswith("row 1:")
    # An unbounded name from the server is quoted bounded.
    long_name = pb.Prediction(probability_up=0.5, model_name="x" * 10_000, model_version=3)
    rejection = check_answer(pb.PredictResponse(predictions=[long_name]), "m", {3})
    assert rejection is not None and rejection.reason == "WRONG_MODEL_NAME"
    assert len(rejection.message) < 200
    # Nothing known about the server: only absurd versions are refused, names not checked.
    assert check_answer(pb.PredictResponse(predictions=[long_name]), "", set()) is None
    zero = pb.Prediction(probability_up=0.5, model_name="m", model_version=0)
    assert check_answer(pb.PredictResponse(predictions=[zero]), "", set()) is not None
