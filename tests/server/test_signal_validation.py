"""``signal_thresholds.validation`` read for GetModelInfo (:func:`signal_validation`): complete,
well-formed figures only (a model with none, or with a broken record, answers without them
rather than with zeros); and the demo's line saying "no edge" where acting did not beat holding.
"""

from __future__ import annotations

from typing import Any

import pytest

from xylen.v1 import model_service_pb2 as pb
from xylen_server.devtools.demo import validation_line
from xylen_server.signals import SignalValidation, signal_validation

FIGURES: dict[str, Any] = {
    "samples": 3388,
    "buy_share": 0.1502,
    "buy_mean_net_return": -0.000546,
    "buy_edge": False,
    "sell_share": 0.175,
    "sell_mean_net_return": 0.00021,
    "sell_edge": True,
}


def test_complete_figures_are_read_as_they_are() -> None:
    got = signal_validation({"buy": 0.4, "sell": 0.3, "validation": dict(FIGURES)})
    assert got == SignalValidation(3388, 0.1502, -0.000546, False, 0.175, 0.00021, True)


@pytest.mark.parametrize(
    "thresholds",
    [
        None,
        {},
        {"buy": 0.4, "sell": 0.3},  # trained before the figures were kept
        {"validation": "no"},
        {"validation": {k: v for k, v in FIGURES.items() if k != "sell_edge"}},
        {"validation": FIGURES | {"samples": 0}},
        {"validation": FIGURES | {"samples": True}},
        {"validation": FIGURES | {"samples": 12.5}},
        {"validation": FIGURES | {"samples": 2**31}},  # past the contract's int32
        {"validation": FIGURES | {"buy_mean_net_return": None}},
        {"validation": FIGURES | {"buy_mean_net_return": float("nan")}},
        {"validation": FIGURES | {"sell_share": "0.2x"}},
        {"validation": FIGURES | {"buy_edge": 1}},
    ],
)
def test_missing_or_broken_figures_give_none(thresholds: Any) -> None:
    assert signal_validation(thresholds) is None


def test_the_demo_says_no_edge_where_acting_did_not_beat_holding() -> None:
    info = pb.ModelInfo(signal_validation=pb.SignalValidation(**FIGURES))
    line = validation_line(info)
    assert "3388 validation bars" in line
    assert "BUY on 15.0% of bars, mean net -5.46 bp: no edge" in line
    assert "SELL on 17.5% of bars, mean net +2.10 bp: an edge" in line
    assert validation_line(pb.ModelInfo()) == (
        "validation of the thresholds: not recorded for this model"
    )
