"""Windows featurised once in the coordinator: same numbers as each server, same refusals."""

from __future__ import annotations

import time
from pathlib import Path

import harness
import numpy as np
import pytest
from coordinator.helpers import four_endpoints, write_config

from training import features
from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator import Coordinator
from xylen_coordinator.featurize import featurized
from xylen_server.errors import InvalidArgument


def test_windows_become_the_offline_features(fleet_candles: dict[str, np.ndarray]) -> None:
    offline = features.compute_features(fleet_candles)
    vector = harness.feature_input(offline[10])
    request = pb.PredictRequest(
        model_name="m",
        inputs=[
            harness.window_input(fleet_candles, 300),
            vector,
            harness.window_input(fleet_candles, 450),
        ],
    )
    out = featurized(request)
    assert out is not None and out.model_name == "m"
    assert [item.WhichOneof("input") for item in out.inputs] == ["features"] * 3
    assert list(out.inputs[0].features.values) == offline[300].tolist()
    assert out.inputs[1] == vector
    assert list(out.inputs[2].features.values) == offline[450].tolist()


def test_a_request_without_windows_is_left_alone(fleet_candles: dict[str, np.ndarray]) -> None:
    row = features.compute_features(fleet_candles)[200]
    assert featurized(pb.PredictRequest(inputs=[harness.feature_input(row)])) is None


def test_a_bad_window_gets_the_servers_reason(fleet_candles: dict[str, np.ndarray]) -> None:
    short = harness.window_input(fleet_candles, 300, length=features.LOOKBACK_PERIODS - 1)
    with pytest.raises(InvalidArgument) as caught:
        featurized(pb.PredictRequest(inputs=[short]))
    assert caught.value.reason == "WINDOW_TOO_SHORT"


def test_servers_with_the_same_features_get_features_and_the_decision_is_unchanged(
    four_servers: list[harness.ServerProcess], fleet_candles: dict[str, np.ndarray], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", four_endpoints(four_servers))
    offline = features.compute_features(fleet_candles)
    ends = (250, 599)
    with Coordinator(config) as coordinator:
        assert coordinator.wait_serving(timeout=30)
        deadline = time.monotonic() + 10
        while not all(state.sends_features for state in coordinator.endpoints()):
            assert time.monotonic() < deadline, "servers never reported their features"
            time.sleep(0.05)
        by_window = coordinator.predict([harness.window_input(fleet_candles, end) for end in ends])
        by_features = coordinator.predict([harness.feature_input(offline[end]) for end in ends])
    for a, b in zip(by_window.rows, by_features.rows, strict=True):
        assert a.probability == b.probability
        assert [v.probability for v in a.votes] == [v.probability for v in b.votes]
