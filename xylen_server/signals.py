"""The trading signal and the one threshold rule, shared by the model server and the coordinator.

``P(up) >= buy`` is BUY, ``P(up) <= sell`` is SELL, anything between is HOLD. A server applies it
to its model's probability, the coordinator to the ensemble's.

Where the thresholds come from (:func:`resolve_thresholds`): the model's own, chosen on its
validation data by the rule in :mod:`training.thresholds` and written to its metadata
(``signal_thresholds``); ``BUY_THRESHOLD`` / ``SELL_THRESHOLD`` override either; a model trained
before thresholds were chosen per model gets :data:`DEFAULT_BUY_THRESHOLD` /
:data:`DEFAULT_SELL_THRESHOLD`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from xylen.v1 import model_service_pb2, types_pb2


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


#: Thresholds of a model whose metadata has none (models trained before per-model thresholds).
DEFAULT_BUY_THRESHOLD = 0.55
DEFAULT_SELL_THRESHOLD = 0.45


class ThresholdSource(StrEnum):
    """Where a served model's thresholds come from."""

    DEFAULT = "default"
    """The model has none: :data:`DEFAULT_BUY_THRESHOLD` / :data:`DEFAULT_SELL_THRESHOLD`."""
    MODEL = "model"
    """The model's metadata (chosen on its validation data)."""
    ENVIRONMENT = "environment"
    """``BUY_THRESHOLD`` and/or ``SELL_THRESHOLD`` (the other one from the model or default)."""


@dataclass(frozen=True)
class SignalThresholds:
    """The thresholds a server applies to its model's probability."""

    buy: float
    sell: float
    source: ThresholdSource
    rule: str = ""
    """How the model's own thresholds were chosen (empty when it has none)."""
    validation: SignalValidation | None = None
    """What the model's own thresholds did on their validation bars (:func:`signal_validation`
    of its metadata, read once with them); None when it has no such figures."""


def resolve_thresholds(
    model: Mapping[str, Any] | None,
    buy_override: float | None = None,
    sell_override: float | None = None,
) -> SignalThresholds:
    """The thresholds to serve: the overrides (``BUY_THRESHOLD`` / ``SELL_THRESHOLD``) where
    set, else the model's own (its metadata's ``signal_thresholds``), else the defaults.
    Raises ValueError naming both values when they would not keep SELL below BUY."""
    own = model if model and "buy" in model and "sell" in model else None
    buy = float(own["buy"]) if own is not None else DEFAULT_BUY_THRESHOLD
    sell = float(own["sell"]) if own is not None else DEFAULT_SELL_THRESHOLD
    source = ThresholdSource.MODEL if own is not None else ThresholdSource.DEFAULT
    if buy_override is not None or sell_override is not None:
        source = ThresholdSource.ENVIRONMENT
    buy = buy if buy_override is None else buy_override
    sell = sell if sell_override is None else sell_override
    if not sell < buy:
        origin = "the model's" if own is not None else "the default"
        raise ValueError(
            f"SELL threshold {sell:g} is not below BUY threshold {buy:g} "
            f"(BUY_THRESHOLD {'unset' if buy_override is None else buy_override}, "
            f"SELL_THRESHOLD {'unset' if sell_override is None else sell_override}, "
            f"otherwise {origin})"
        )
    rule = str(own.get("rule", ""))[:80] if own is not None else ""
    return SignalThresholds(buy, sell, source, rule, signal_validation(own))


@dataclass(frozen=True)
class SignalValidation:
    """What a model's own thresholds did on the validation bars they were chosen on, net of
    the fee (``xylen.v1.SignalValidation`` has the same fields): per side the share of bars it
    acted on, the mean net log return of acting, and whether that beat holding (the edge)."""

    samples: int
    buy_share: float
    buy_mean_net_return: float
    buy_edge: bool
    sell_share: float
    sell_mean_net_return: float
    sell_edge: bool

    def proto(self) -> model_service_pb2.SignalValidation:
        """The ``xylen.v1.SignalValidation`` message of these figures."""
        return model_service_pb2.SignalValidation(**dataclasses.asdict(self))

    @classmethod
    def from_model_info(cls, info: Any) -> SignalValidation | None:
        """The ``signal_validation`` of a ``xylen.v1.ModelInfo`` (a server's GetModelInfo), or
        None when ``info`` is None or the field is unset."""
        if info is None or not info.HasField("signal_validation"):
            return None
        message = info.signal_validation
        return cls(**{f.name: getattr(message, f.name) for f in dataclasses.fields(cls)})


def signal_validation(model: Mapping[str, Any] | None) -> SignalValidation | None:
    """The validation figures of a model's ``signal_thresholds`` (its metadata), or None when
    it has none or they are not complete and well-formed (a model trained before they were kept
    answers without them rather than with made-up zeros)."""
    figures = model.get("validation") if isinstance(model, Mapping) else None
    if not isinstance(figures, Mapping):
        return None
    try:
        samples = figures["samples"]
        numbers = [
            float(figures[key])
            for key in (
                "buy_share",
                "buy_mean_net_return",
                "sell_share",
                "sell_mean_net_return",
            )
        ]
        edges = figures["buy_edge"], figures["sell_edge"]
    except (KeyError, TypeError, ValueError):
        return None
    if (
        not isinstance(samples, int)
        or isinstance(samples, bool)
        or not 0 < samples < 2**31  # the contract's int32
        or not all(math.isfinite(n) for n in numbers)
        or not all(isinstance(edge, bool) for edge in edges)
    ):
        return None
    buy_share, buy_mean, sell_share, sell_mean = numbers
    return SignalValidation(samples, buy_share, buy_mean, edges[0], sell_share, sell_mean, edges[1])


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
