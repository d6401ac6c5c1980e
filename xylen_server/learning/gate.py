"""The validation gate: whether a retrained candidate may replace the serving model.

A pure function of the held-out labels and both models' probabilities on them, free of files
and processes, so it can be checked by hand (like the coordinator's ``combine``).

The candidate passes if its log loss is at most the serving model's plus ``margin`` and its
AUC at least ``min_auc`` and beyond what chance gives on a window of this size
(:func:`chance_auc`, one-sided at ``z``): a noise-trained, near-constant candidate can beat a
confident serving model on log loss, never on both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from training.evaluate import auc, log_loss


class GateError(ValueError):
    """The held-out window cannot be scored (a single class, non-finite probabilities)."""


@dataclass(frozen=True)
class Verdict:
    """Both models' scores on the same held-out rows and the decision (``xylen.v1.GateVerdict``
    has the same fields)."""

    holdout_samples: int
    serving_log_loss: float
    candidate_log_loss: float
    serving_auc: float
    candidate_auc: float
    margin: float
    min_auc: float
    """The AUC the candidate needed: the configured minimum or chance's bound, the larger."""
    passed: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def chance_auc(y: np.ndarray, z: float) -> float:
    """The AUC a model with no skill exceeds with one-sided probability ~Phi(-z) on labels ``y``
    (normal approximation of the Mann-Whitney statistic under the null: SE^2 =
    (n + 1) / (12 n1 n0)). On a small window a lucky noise model reaches 0.56; this bound keeps
    it out."""
    n1 = int(np.sum(y))
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return 1.0
    return 0.5 + z * math.sqrt((len(y) + 1) / (12.0 * n1 * n0))


def gate(
    y: np.ndarray,
    serving: np.ndarray,
    candidate: np.ndarray,
    margin: float,
    min_auc: float,
    z: float,
) -> Verdict:
    """Score both models on the same held-out rows and decide (see the module docstring)."""
    if len(np.unique(y)) < 2:
        raise GateError("the held-out labels hold a single class; AUC is undefined")
    for name, p in (("serving model", serving), ("candidate", candidate)):
        if not np.isfinite(p).all():
            raise GateError(f"the {name} produced non-finite probabilities on the held-out window")
    serving_loss, candidate_loss = log_loss(y, serving), log_loss(y, candidate)
    serving_auc, candidate_auc = auc(y, serving), auc(y, candidate)
    needed = max(min_auc, chance_auc(y, z))
    loss_ok = candidate_loss <= serving_loss + margin
    auc_ok = candidate_auc >= needed
    scores = (
        f"log loss {candidate_loss:.4f} vs serving {serving_loss:.4f} (margin {margin:g}), AUC "
        f"{candidate_auc:.4f} vs serving {serving_auc:.4f} (needed {needed:.3f}) on {len(y)} "
        "held-out samples"
    )
    if loss_ok and auc_ok:
        reason = f"candidate not worse: {scores}"
    elif not loss_ok:
        reason = f"candidate worse than the serving model: {scores}"
    else:
        reason = f"candidate learned too little: {scores}"
    return Verdict(
        holdout_samples=len(y),
        serving_log_loss=serving_loss,
        candidate_log_loss=candidate_loss,
        serving_auc=serving_auc,
        candidate_auc=candidate_auc,
        margin=margin,
        min_auc=needed,
        passed=bool(loss_ok and auc_ok),
        reason=reason,
    )
