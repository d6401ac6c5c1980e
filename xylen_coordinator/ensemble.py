"""The ensemble arithmetic, free of gRPC and I/O so it can be checked by hand.

* :func:`combine` -- the weighted mean of the voters' up-probabilities with the weights
  renormalised over those who voted, the signal from the thresholds, and the disagreement (the
  weighted standard deviation of the votes).
* :func:`label_plan` -- which voters' probabilities mean the same thing (same horizon, fee and
  label threshold) and may be combined; the others are left out with the reason.
* :func:`member_thresholds` -- the ensemble's BUY / SELL thresholds from its members' own.
* :func:`quorum_shortfall` -- whether enough servers voted to answer at all.
* :class:`AdaptiveWeights` -- each model's live record on matured outcomes (exponentially
  decayed Brier score and hit rate against the label the model was trained for, net of its own
  fee) and the multiplier it earns, within a floor and a cap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from xylen_coordinator.config import Adaptive, Quorum, Thresholds
from xylen_server.signals import Signal, signal_for


class NoVotes(ValueError):
    """Nobody with a positive weight voted: there is no decision to make."""


@dataclass(frozen=True)
class Decision:
    """The ensemble's answer for one row."""

    probability: float
    """Weighted mean up-probability of the voters."""
    signal: Signal
    """BUY / SELL / HOLD from :attr:`probability` and the thresholds."""
    disagreement: float
    """Weighted standard deviation of the votes around :attr:`probability` (0..0.5)."""
    weights: Mapping[str, float]
    """Normalised weight of each voter (they sum to 1)."""


def combine(
    votes: Mapping[str, float], weights: Mapping[str, float], thresholds: Thresholds
) -> Decision:
    """Combine one row's votes (voter name -> up-probability) with ``weights`` (name -> weight).

    Only the voters' weights count: they are renormalised to sum to 1, so a missing server
    shifts its share to the others in proportion. Raises :class:`NoVotes` when no voter has a
    positive weight, and :class:`ValueError` for a voter without a weight or a probability
    outside [0, 1].
    """
    raw: dict[str, float] = {}
    for name, probability in votes.items():
        if name not in weights:
            raise ValueError(f"voter {name!r} has no weight")
        if not (math.isfinite(probability) and 0.0 <= probability <= 1.0):
            raise ValueError(f"voter {name!r} gave probability {probability!r}, not in [0, 1]")
        weight = weights[name]
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"voter {name!r} has weight {weight!r}")
        raw[name] = weight
    total = math.fsum(raw.values())
    if total <= 0:
        raise NoVotes("no voter with a positive weight")
    normalised = {name: weight / total for name, weight in raw.items()}
    counted = [votes[name] for name, weight in raw.items() if weight > 0]
    probability = _weighted_mean([(raw[name], votes[name]) for name in raw], total, counted)
    variance = math.fsum(normalised[name] * (votes[name] - probability) ** 2 for name in normalised)
    return Decision(
        probability=probability,
        signal=signal_for(probability, thresholds.buy, thresholds.sell),
        disagreement=math.sqrt(variance),
        weights=normalised,
    )


def _weighted_mean(
    pairs: Iterable[tuple[float, float]], total: float, values: list[float]
) -> float:
    """The mean of the values of ``pairs`` (weight, value) weighted by their weights (summing
    to ``total``), kept within the smallest and largest of ``values`` (those of a positive
    weight): dividing each weight by the total first left a rounding error that put two votes
    of 0.55 at 0.5499999999999999, below a BUY threshold of 0.55, so a unanimous BUY came out
    HOLD. A mean of equal values is that value, exactly."""
    mean = math.fsum(weight * value for weight, value in pairs) / total
    return min(max(values), max(min(values), mean))


#: What a model's probability means: (horizon in bars, round-trip fee, label threshold).
Label = tuple[int, float, float]


def describe_label(label: Label) -> str:
    horizon, fee, threshold = label
    return (
        f"P(up over {horizon} bar{'s' if horizon != 1 else ''} net of fee {fee:g} > {threshold:g})"
    )


def label_plan(
    labels: Mapping[str, Label | None], configured: Mapping[str, float]
) -> tuple[Label | None, dict[str, str]]:
    """The label definition the ensemble combines and the servers left out (name -> reason).

    Probabilities are only averaged when they answer the same question. Among the servers
    whose model info is known (``labels``: name -> label, None when unknown), the definition
    carrying the most configured weight wins (ties: the shorter horizon, then the smaller fee
    and label threshold); a server of another definition is left out of the combination and its
    vote says why. A server whose definition is not known yet is not left out. Computed over
    every configured server, not this call's voters, so a server going down never changes what
    the ensemble's probability means.
    """
    weights: dict[Label, list[float]] = {}
    for name, label in labels.items():
        if label is not None:
            weights.setdefault(label, []).append(configured.get(name, 0.0))
    if not weights:
        return None, {}
    totals = {label: math.fsum(values) for label, values in weights.items()}
    most = max(totals.values())
    # Equal weights tie whatever their rounding (0.1 + 0.2 against 0.3), so the rule above
    # decides, not the last bit of a float sum.
    tied = [label for label, total in totals.items() if math.isclose(total, most, rel_tol=1e-9)]
    chosen = min(tied)  # the shorter horizon, then the smaller fee and label threshold
    left_out = {
        name: (
            f"not combined: its probability is {describe_label(label)}, the ensemble's is "
            f"{describe_label(chosen)}"
        )
        for name, label in labels.items()
        if label is not None and label != chosen
    }
    return chosen, left_out


def member_thresholds(
    weights: Mapping[str, float],
    members: Mapping[str, tuple[float, float] | None],
    fallback: Thresholds,
) -> Thresholds:
    """The ensemble's thresholds from its voters' own: each voter's (buy, sell) weighted by its
    share of the combination (``weights``, renormalised over the positive ones), a voter with
    unknown thresholds counting with ``fallback``'s. The ensemble probability is the same
    weighted mean of the voters' probabilities, so it crosses the mean threshold where its
    members (weighted) cross their own: each member's threshold keeps the meaning its rule gave
    it (``training.thresholds``). ``fallback`` itself when no voter has a positive weight."""
    total = math.fsum(w for w in weights.values() if w > 0)
    if total <= 0:
        return fallback
    counted = [(weight, members.get(name)) for name, weight in weights.items() if weight > 0]
    buys = [(w, own[0] if own is not None else fallback.buy) for w, own in counted]
    sells = [(w, own[1] if own is not None else fallback.sell) for w, own in counted]
    return Thresholds(
        buy=_weighted_mean(buys, total, [b for _, b in buys]),
        sell=_weighted_mean(sells, total, [s for _, s in sells]),
        source=fallback.source,
    )


def quorum_shortfall(
    voters: Iterable[str], enabled_weights: Mapping[str, float], quorum: Quorum
) -> str | None:
    """Why the voters fall short of the quorum, or None when they meet it.

    ``enabled_weights`` are the configured weights of every enabled endpoint; the voters'
    share of their total must reach ``quorum.min_weight_fraction``. Only a vote that is
    combined counts: the caller passes the voters not left out (:func:`label_plan`), and a
    voter of weight 0 (a shadow endpoint) counts towards neither figure.
    """
    voters = [name for name in voters if enabled_weights.get(name, 0.0) > 0]
    total = math.fsum(enabled_weights.values())
    voted = math.fsum(enabled_weights[name] for name in voters)
    if len(voters) < quorum.min_votes:
        return (
            f"{len(voters)} of {len(enabled_weights)} servers voted with a weight that counts; "
            f"the quorum needs at least {quorum.min_votes}"
        )
    fraction = voted / total if total > 0 else 0.0
    # A tiny tolerance so that e.g. 0.3 + 0.2 reaches a quorum of 0.5.
    if fraction + 1e-12 < quorum.min_weight_fraction:
        return (
            f"the servers that voted carry {fraction:.0%} of the configured weight; the quorum "
            f"needs {quorum.min_weight_fraction:.0%}"
        )
    return None


@dataclass(frozen=True)
class AdaptiveScore:
    """One model's live record and the multiplier it earns."""

    metric: str
    brier_score: float
    hit_rate: float
    effective_outcomes: float
    multiplier: float


def adaptive_multiplier(
    brier_score: float, hit_rate: float, effective_outcomes: float, settings: Adaptive
) -> float:
    """The factor applied to a model's configured weight.

    ``brier``: 0.25 / Brier (a coin flip's Brier score is 0.25, so an uninformative model gets 1,
    a better one more). ``hit_rate``: hit rate / 0.5. Clamped to [floor, cap]; exactly 1 until
    ``min_outcomes`` effective outcomes have matured.
    """
    if effective_outcomes < settings.min_outcomes or effective_outcomes <= 0:
        return 1.0
    if settings.metric == "brier":
        raw = 0.25 / brier_score if brier_score > 0 else math.inf
    else:
        raw = hit_rate / 0.5
    return min(settings.cap, max(settings.floor, raw))


class AdaptiveWeights:
    """Exponentially decayed Brier score and hit rate per model, updated per matured outcome.

    Each outcome enters as ``S <- d*S + x`` and ``W <- d*W + 1`` with ``d = 0.5 ** (1 /
    half_life_outcomes)``; the score is ``S / W`` (a bias-free decayed mean) and ``W`` is the
    effective number of outcomes behind it.
    """

    def __init__(self, settings: Adaptive) -> None:
        self.settings = settings
        self._decay = 0.5 ** (1.0 / settings.half_life_outcomes)
        self._state: dict[str, list[float]] = {}  # name -> [brier_sum, hit_sum, weight_sum]

    def reconfigure(self, settings: Adaptive) -> None:
        """Adopt new settings, keeping the record (the decay applies from the next outcome)."""
        self.settings = settings
        self._decay = 0.5 ** (1.0 / settings.half_life_outcomes)

    def record(self, name: str, probability: float, label: bool) -> None:
        """Score ``name``'s matured prediction ``probability`` against ``label``: the label
        its model was trained for, computed from the outcome with the model's own horizon, fee
        and label threshold (:mod:`xylen_coordinator.feedback`), not "the price rose"."""
        y = 1.0 if label else 0.0
        brier = (probability - y) ** 2
        hit = 1.0 if (probability >= 0.5) == label else 0.0
        state = self._state.setdefault(name, [0.0, 0.0, 0.0])
        d = self._decay
        state[0] = d * state[0] + brier
        state[1] = d * state[1] + hit
        state[2] = d * state[2] + 1.0

    def score(self, name: str) -> AdaptiveScore:
        """The record and multiplier of ``name`` (neutral before any outcome)."""
        brier_sum, hit_sum, n = self._state.get(name, (0.0, 0.0, 0.0))
        brier = brier_sum / n if n else 0.0
        hit = hit_sum / n if n else 0.0
        multiplier = adaptive_multiplier(brier, hit, n, self.settings)
        return AdaptiveScore(self.settings.metric, brier, hit, n, multiplier)

    def weights(self, configured: Mapping[str, float]) -> dict[str, float]:
        """Configured weights times each model's multiplier."""
        return {name: w * self.score(name).multiplier for name, w in configured.items()}
