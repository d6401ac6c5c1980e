"""build_record: every Feedback value checked against the limits the store and training need,
before anything is stored, with a stable reason and a message that never echoes a long input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from xylen_server.errors import InvalidArgument, NotFound
from xylen_server.learning.feedback import build_record
from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.prediction_log import PredictionLog
from xylen_server.learning.samples import FeedbackRecord

NOW = datetime.now(UTC).replace(microsecond=0)  # the log ages rows by the wall clock


def stamp(moment: datetime) -> tuple[int, int]:
    """``moment`` as a Timestamp's (seconds, nanos)."""
    seconds = int(moment.timestamp())
    return seconds, (moment.microsecond * 1000)


@pytest.fixture
def log() -> PredictionLog:
    log = PredictionLog(None)
    features = np.array([[0.1, 0.2, 0.3]], dtype=np.float32)
    time_ms = int((NOW - timedelta(hours=1)).timestamp() * 1000)
    log.record(["known"], features, [0.7], [1], "model_1", 4, time_ms=time_ms)
    return log


def _build(log: PredictionLog, **overrides: object) -> FeedbackRecord:
    fields: dict[str, object] = {
        "prediction_id": "known",
        "pnl": 12.5,
        "realized_return": 0.02,
        "close_time": stamp(NOW - timedelta(minutes=5)),
        "features": None,
        "prediction_log": log,
        "model_name": "model_1",
        "feature_count": 3,
        "side": 1,  # a long trade: its return is the underlying's
        "now": NOW,
    }
    fields.update(overrides)
    return build_record(**fields)  # type: ignore[arg-type]


def test_build_record_joins_the_logged_prediction(log: PredictionLog) -> None:
    rec = _build(log, features=[0.1, 0.2, 0.3])  # float64 values that round to the logged row
    assert (rec.model_version, rec.probability_up, rec.signal, rec.label) == (4, 0.7, 1, 1)
    assert (
        rec.features.dtype == np.float32
        and rec.features.tolist() == log.get("known").features.tolist()
    )  # type: ignore[union-attr]
    assert rec.received_time_ms == int(NOW.timestamp() * 1000)
    assert rec.close_time_ms == int((NOW - timedelta(minutes=5)).timestamp() * 1000)
    assert _build(log, realized_return=0.0).label == 0


def test_build_record_with_features_for_an_unlogged_prediction(log: PredictionLog) -> None:
    rec = _build(log, prediction_id="gone", features=[1.0, 2.0, 3.0])
    assert rec.model_version is None and rec.probability_up is None
    assert rec.features.tolist() == [1.0, 2.0, 3.0]


def test_limits_are_inclusive(log: PredictionLog) -> None:
    """The largest values each limit allows are stored and read back as sent."""
    f32_max = float(np.finfo(np.float32).max)
    rec = _build(log, prediction_id="é" * 64, features=[f32_max, -f32_max, 0.0],
                 close_time=(946_684_800, 999_999_999))  # fmt: skip
    assert rec.features.tolist() == [f32_max, -f32_max, 0.0]
    assert rec.close_time_ms == 946_684_800_999


@pytest.mark.parametrize(
    ("overrides", "error", "reason"),
    [
        ({"prediction_id": "nope"}, NotFound, "UNKNOWN_PREDICTION_ID"),
        ({"prediction_id": ""}, InvalidArgument, "MISSING_PREDICTION_ID"),
        ({"prediction_id": "x" * 129}, InvalidArgument, "PREDICTION_ID_TOO_LONG"),
        ({"prediction_id": "é" * 65}, InvalidArgument, "PREDICTION_ID_TOO_LONG"),  # 130 bytes
        ({"pnl": float("nan")}, InvalidArgument, "INVALID_OUTCOME"),
        ({"pnl": float("-inf")}, InvalidArgument, "INVALID_OUTCOME"),
        ({"realized_return": float("inf")}, InvalidArgument, "INVALID_OUTCOME"),
        ({"close_time": None}, InvalidArgument, "INVALID_OUTCOME"),
        ({"close_time": stamp(NOW - timedelta(days=1))}, InvalidArgument, "INVALID_OUTCOME"),
        ({"close_time": stamp(NOW + timedelta(minutes=1))}, InvalidArgument, "OUTCOME_IN_FUTURE"),
        ({"close_time": (2**62, 0)}, InvalidArgument, "OUTCOME_IN_FUTURE"),
        ({"close_time": (253_402_300_800, 0)}, InvalidArgument, "OUTCOME_IN_FUTURE"),  # 10000
        ({"close_time": (-(2**62), 0)}, InvalidArgument, "INVALID_OUTCOME"),
        ({"close_time": (946_684_799, 0)}, InvalidArgument, "INVALID_OUTCOME"),  # 1999
        ({"close_time": (1_700_000_000, -1)}, InvalidArgument, "INVALID_OUTCOME"),
        ({"close_time": (1_700_000_000, 10**9)}, InvalidArgument, "INVALID_OUTCOME"),
        ({"features": [0.1, 0.2, 0.31]}, InvalidArgument, "FEATURES_MISMATCH"),
        ({"features": [0.1, 0.2]}, InvalidArgument, "FEATURES_MISMATCH"),
        ({"features": [0.1, float("nan"), 0.3]}, InvalidArgument, "NON_FINITE_FEATURE"),
        ({"features": [0.1, 1e300, 0.3]}, InvalidArgument, "FEATURE_OUT_OF_RANGE"),
        (
            {"prediction_id": "gone", "features": [1.0, -1e39, 3.0]},  # -inf in float32
            InvalidArgument,
            "FEATURE_OUT_OF_RANGE",
        ),
        (
            {"prediction_id": "gone", "features": [1.0, 2.0]},
            InvalidArgument,
            "FEATURE_COUNT_MISMATCH",
        ),
        (
            {"prediction_id": "gone", "features": [1.0] * 100_000},
            InvalidArgument,
            "FEATURE_COUNT_MISMATCH",
        ),
    ],
)
def test_build_record_refuses(
    log: PredictionLog, overrides: dict[str, object], error: type[Exception], reason: str
) -> None:
    with pytest.raises(error) as caught:
        _build(log, **overrides)
    assert caught.value.reason == reason  # type: ignore[attr-defined]
    assert len(str(caught.value)) < 200  # names the problem without echoing long input


def test_the_id_limit_is_a_setting_and_long_ids_are_not_echoed(log: PredictionLog) -> None:
    long_id = "y" * 1_000_000
    with pytest.raises(NotFound) as unknown:  # allowed by a raised limit, but unknown
        _build(log, prediction_id=long_id, max_id_bytes=10**7)
    assert len(unknown.value.message) < 200
    assert all(len(value) <= 64 for value in unknown.value.metadata.values())
    with pytest.raises(InvalidArgument) as too_long:
        _build(log, prediction_id="z" * 11, max_id_bytes=10)
    assert too_long.value.reason == "PREDICTION_ID_TOO_LONG"
    assert "FEEDBACK_MAX_ID_BYTES" in too_long.value.message and "z" not in too_long.value.message
    assert too_long.value.metadata == {"limit": "10", "size": "11"}


def test_clock_skew_is_allowed(log: PredictionLog) -> None:
    assert _build(log, close_time=stamp(NOW + timedelta(seconds=3))).close_time_ms > 0
    with pytest.raises(InvalidArgument):
        _build(log, close_time=stamp(NOW + timedelta(seconds=3)), max_clock_skew_seconds=1.0)


def test_repeat_of_a_stored_id_is_a_duplicate_not_not_found(tmp_path: Path) -> None:
    with FeedbackStore(tmp_path) as store:
        first = _build(PredictionLog(None), prediction_id="p-1", features=[1.0, 2.0, 3.0])
        assert not store.append(first).duplicate
        again = _build(PredictionLog(None), prediction_id="p-1", already_stored=store)
        assert store.append(again).duplicate
