"""The ensemble combines only probabilities that mean the same thing, and its thresholds follow
its members' own: by hand (pure functions) and over real servers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest
from coordinator.helpers import endpoint, free_port, write_config, write_model_with

from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator import Coordinator
from xylen_coordinator.config import Thresholds
from xylen_coordinator.ensemble import label_plan, member_thresholds
from xylen_server.errors import Unavailable
from xylen_server.signals import SignalValidation, signal_for

H1 = (1, 0.001, 0.0)
H4 = (4, 0.001, 0.0)
H1A_VALIDATION = {
    "samples": 500,
    "buy_share": 0.2,
    "buy_mean_net_return": 0.0004,
    "buy_edge": True,
    "sell_share": 0.15,
    "sell_mean_net_return": -0.0002,
    "sell_edge": False,
}


def test_the_label_with_the_most_weight_is_combined_the_rest_left_out() -> None:
    labels = {"a": H1, "b": H1, "c": H4, "d": None}
    chosen, left_out = label_plan(labels, {"a": 0.3, "b": 0.2, "c": 0.4, "d": 0.1})
    assert chosen == H1  # 0.5 of the weight against 0.4
    assert set(left_out) == {"c"}  # an unknown label is not left out
    assert "over 4 bars" in left_out["c"] and "over 1 bar net of fee 0.001" in left_out["c"]
    # Equal weight: the shorter horizon; a different fee is another meaning too.
    chosen, left_out = label_plan({"a": H1, "c": H4}, {"a": 1.0, "c": 1.0})
    assert chosen == H1 and set(left_out) == {"c"}
    chosen, left_out = label_plan({"a": H1, "f": (1, 0.0, 0.0)}, {"a": 1.0, "f": 2.0})
    assert chosen == (1, 0.0, 0.0) and set(left_out) == {"a"}
    assert label_plan({"a": None}, {"a": 1.0}) == (None, {})


def test_a_tie_in_weight_is_a_tie_whatever_the_rounding_of_its_sum() -> None:
    # 0.1 + 0.2 is 0.30000000000000004 in floats: still the same weight as 0.3, so the shorter
    # horizon wins, as it does for weights 1 + 2 against 3.
    labels = {"a": H4, "b": H4, "c": H1}
    for weights in ({"a": 0.1, "b": 0.2, "c": 0.3}, {"a": 1.0, "b": 2.0, "c": 3.0}):
        chosen, left_out = label_plan(labels, weights)
        assert chosen == H1 and set(left_out) == {"a", "b"}


def test_member_thresholds_are_weighted_like_the_probabilities() -> None:
    fallback = Thresholds(buy=0.55, sell=0.45)
    got = member_thresholds(
        {"a": 0.5, "b": 0.3, "c": 0.0, "d": 0.2},
        {"a": (0.6, 0.4), "b": (0.7, 0.3), "c": (0.9, 0.1), "d": None},
        fallback,
    )
    # c has weight 0 (left out); d's thresholds are unknown: the fallback stands in for them.
    assert got.buy == pytest.approx(0.5 * 0.6 + 0.3 * 0.7 + 0.2 * 0.55)
    assert got.sell == pytest.approx(0.5 * 0.4 + 0.3 * 0.3 + 0.2 * 0.45)
    assert member_thresholds({"a": 0.0}, {"a": (0.6, 0.4)}, fallback) == fallback
    # Members that share thresholds give exactly those: summing six shares of 0.65 made
    # 0.6500000000000001, so a unanimous 0.65 was not a BUY.
    six = dict.fromkeys("abcdef", 1.0)
    same = member_thresholds(six, dict.fromkeys(six, (0.65, 0.35)), fallback)
    assert (same.buy, same.sell) == (0.65, 0.35)


def test_votes_left_out_and_thresholds_reach_the_contract() -> None:
    from xylen_coordinator.convert import predict_response
    from xylen_coordinator.results import EnsembleResult, RowDecision, VoteInfo
    from xylen_server.signals import Signal

    vote = VoteInfo("h4", 0.7, Signal.BUY, 0.0, 0.0, 0.2, "h4", 1, "p-1", 0.001, None, "why")
    row = RowDecision("ens-1", 0.5, Signal.HOLD, 0.0, (vote,), 0.61, 0.37)
    message = predict_response(EnsembleResult((row,), (), "static", 0.01)).predictions[0]
    assert (message.buy_threshold, message.sell_threshold) == (0.61, 0.37)
    assert message.votes[0].left_out_reason == "why"


@pytest.fixture(scope="module")
def three_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, harness.ServerProcess]]:
    root = tmp_path_factory.mktemp("label-groups")
    write_model_with(
        root,
        "h1a",
        1,
        fee=0.001,
        signal_thresholds={"buy": 0.6, "sell": 0.4, "rule": "t", "validation": H1A_VALIDATION},
    )
    write_model_with(
        root, "h1b", 2, fee=0.001, signal_thresholds={"buy": 0.7, "sell": 0.3, "rule": "t"}
    )
    write_model_with(
        root, "h4", 3, fee=0.001, horizon=4, signal_thresholds={"buy": 0.5, "sell": 0.2}
    )
    servers = {name: harness.start_server(root, name, wait=False) for name in ("h1a", "h1b", "h4")}
    try:
        for process in servers.values():
            process.wait_serving()
        yield servers
    finally:
        for process in servers.values():
            process.stop()


def _config(path: Path, servers: dict[str, harness.ServerProcess], **sections: object) -> Path:
    weights = {"h1a": 0.5, "h1b": 0.3, "h4": 0.2}
    return write_config(
        path, [endpoint(n, servers[n].port, w) for n, w in weights.items()], **sections
    )


def _wait_for_info(coordinator: Coordinator) -> None:
    deadline = time.monotonic() + 10
    while not all(state.sends_features for state in coordinator.endpoints()):
        assert time.monotonic() < deadline, "servers never reported their model info"
        time.sleep(0.05)


def test_real_servers_of_another_horizon_are_left_out(
    three_servers: dict[str, harness.ServerProcess],
    fleet_candles: dict,
    tmp_path: Path,
) -> None:
    with Coordinator(_config(tmp_path / "config.yaml", three_servers)) as coordinator:
        assert coordinator.wait_serving(timeout=30)
        _wait_for_info(coordinator)
        result = coordinator.predict([harness.window_input(fleet_candles, e) for e in (300, 599)])
    for row in result.rows:
        votes = {v.server_name: v for v in row.votes}
        assert set(votes) == {"h1a", "h1b", "h4"}  # every vote is reported ...
        assert votes["h4"].normalized_weight == 0.0 and votes["h4"].weight == 0.0
        assert "over 4 bars" in votes["h4"].left_out  # ... and says why it was not combined
        assert votes["h1a"].left_out == votes["h1b"].left_out == ""
        p = (0.5 * votes["h1a"].probability + 0.3 * votes["h1b"].probability) / 0.8
        assert row.probability == pytest.approx(p, abs=1e-12)
        assert row.buy_threshold == pytest.approx((0.5 * 0.6 + 0.3 * 0.7) / 0.8)
        assert row.sell_threshold == pytest.approx((0.5 * 0.4 + 0.3 * 0.3) / 0.8)
        assert row.signal is signal_for(row.probability, row.buy_threshold, row.sell_threshold)


def test_the_quorum_counts_only_the_votes_that_are_combined(
    three_servers: dict[str, harness.ServerProcess],
    fleet_candles: dict,
    tmp_path: Path,
) -> None:
    # h1a (1 bar) and h4 (4 bars) vote, 65 % of the weight; the third endpoint never answers.
    # Only h1a's 40 % is combined (h4 is left out): one vote, short of the quorum's two and of
    # its half of the weight. Before, the left-out vote counted and h1a alone decided.
    gone = endpoint("gone", free_port(), 0.35)
    config = write_config(
        tmp_path / "config.yaml",
        [endpoint("h1a", three_servers["h1a"].port, 0.4), gone,
         endpoint("h4", three_servers["h4"].port, 0.25)],
        quorum={"min_weight_fraction": 0.5, "min_votes": 2},
    )  # fmt: skip
    with Coordinator(config) as coordinator:
        deadline = time.monotonic() + 30
        while not all(
            state.sends_features for state in coordinator.endpoints() if state.name != "gone"
        ):
            assert time.monotonic() < deadline, "servers never reported their model info"
            time.sleep(0.05)
        with pytest.raises(Unavailable) as refused:
            coordinator.predict([harness.window_input(fleet_candles, 300)], timeout=2)
    assert refused.value.reason == "NO_QUORUM"
    assert "1 of 3 servers voted with a weight that counts" in refused.value.message


def test_fixed_thresholds_when_configured(
    three_servers: dict[str, harness.ServerProcess],
    fleet_candles: dict,
    tmp_path: Path,
) -> None:
    config = _config(
        tmp_path / "config.yaml",
        three_servers,
        thresholds={"source": "fixed", "buy": 0.52, "sell": 0.48},
    )
    with Coordinator(config) as coordinator:
        assert coordinator.wait_serving(timeout=30)
        _wait_for_info(coordinator)
        row = coordinator.predict([harness.window_input(fleet_candles, 400)]).decision
    assert (row.buy_threshold, row.sell_threshold) == (0.52, 0.48)
    assert row.signal is signal_for(row.probability, 0.52, 0.48)


def test_each_members_validated_edge_reaches_the_ensemble_info(
    three_servers: dict[str, harness.ServerProcess], tmp_path: Path
) -> None:
    from xylen_coordinator.convert import info_response

    with Coordinator(_config(tmp_path / "config.yaml", three_servers)) as coordinator:
        assert coordinator.wait_serving(timeout=30)
        _wait_for_info(coordinator)
        states = coordinator.endpoints()
        info = info_response(coordinator.config, states, 0)
    validation = {state.name: state.signal_validation for state in states}
    assert validation == {"h1a": SignalValidation(**H1A_VALIDATION), "h1b": None, "h4": None}
    endpoints = {e.name: e for e in info.endpoints}
    assert endpoints["h1a"].HasField("signal_validation")
    assert endpoints["h1a"].signal_validation == pb.SignalValidation(**H1A_VALIDATION)
    assert not endpoints["h1b"].HasField("signal_validation")
    assert not endpoints["h4"].HasField("signal_validation")
