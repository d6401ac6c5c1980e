"""The trading signal and the one threshold rule, shared by the model server and the coordinator.

``P(up) >= buy`` is BUY, ``P(up) <= sell`` is SELL, anything between is HOLD. A server applies it
to its model's probability, the coordinator to the ensemble's.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from xylen.v1 import types_pb2


class Signal(StrEnum):
    """BUY, SELL or HOLD (the contract's ``xylen.v1.Signal`` without its UNSPECIFIED zero)."""

    BUY = "BUY"
    SELL = "SELL"
    HOLD = "HOLD"

    @property
    def proto(self) -> types_pb2.Signal.ValueType:
        """The ``xylen.v1.Signal`` number."""
        return TO_PROTO[self]


TO_PROTO: dict[Signal, types_pb2.Signal.ValueType] = {
    Signal.BUY: types_pb2.SIGNAL_BUY,
    Signal.SELL: types_pb2.SIGNAL_SELL,
    Signal.HOLD: types_pb2.SIGNAL_HOLD,
}
FROM_PROTO: dict[int, Signal] = {number: signal for signal, number in TO_PROTO.items()}


def signal_for(probability: float, buy_threshold: float, sell_threshold: float) -> Signal:
    """BUY at or above ``buy_threshold``, SELL at or below ``sell_threshold``, else HOLD."""
    if probability >= buy_threshold:
        return Signal.BUY
    if probability <= sell_threshold:
        return Signal.SELL
    return Signal.HOLD


def signal_numbers(
    probabilities: Iterable[float], buy_threshold: float, sell_threshold: float
) -> list[int]:
    """The ``xylen.v1.Signal`` number of each probability (the serving hot path)."""
    return [TO_PROTO[signal_for(p, buy_threshold, sell_threshold)] for p in probabilities]
