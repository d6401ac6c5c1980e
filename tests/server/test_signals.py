"""The one threshold rule of the model server and the coordinator."""

from __future__ import annotations

import pytest

from xylen.v1 import types_pb2
from xylen_server.signals import Signal, signal_for


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.55, types_pb2.SIGNAL_BUY),
        (0.9, types_pb2.SIGNAL_BUY),
        (0.45, types_pb2.SIGNAL_SELL),
        (0.0, types_pb2.SIGNAL_SELL),
        (0.5, types_pb2.SIGNAL_HOLD),
        (0.5499, types_pb2.SIGNAL_HOLD),
    ],
)
def test_signal_thresholds_are_inclusive(p, expected):
    assert signal_for(p, 0.55, 0.45).proto == expected


def test_the_signal_is_its_name_and_its_contract_number():
    assert Signal.BUY == "BUY" and Signal.BUY.proto == types_pb2.SIGNAL_BUY
    assert Signal.SELL.proto == types_pb2.SIGNAL_SELL and Signal.HOLD.proto == types_pb2.SIGNAL_HOLD
