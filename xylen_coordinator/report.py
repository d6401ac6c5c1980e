"""Results as text: the CLI's and the demo's printout, and the list of missing votes that
error messages carry."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from xylen_coordinator.results import EnsembleResult, Missing


def format_result(result: EnsembleResult, times: list[int] | None = None) -> str:
    """The decision of each row and every vote, as the CLI prints it."""
    lines = []
    for n, row in enumerate(result.rows):
        when = ""
        if times is not None:
            when = " @ " + datetime.fromtimestamp(times[n] / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        lines.append(
            f"{row.signal.value:<4} p_up={row.probability:.4f} (BUY >= {row.buy_threshold:.4f}, "
            f"SELL <= {row.sell_threshold:.4f}) disagreement={row.disagreement:.4f}"
            f"{when}  id={row.prediction_id}"
        )
        lines.append(
            f"  {'server':<12}{'p_up':>8}  {'signal':<6}{'weight':>8}{'share':>8}  "
            f"{'model':<12}{'ver':>4}{'latency':>10}"
        )
        for v in row.votes:
            lines.append(
                f"  {v.server_name:<12}{v.probability:>8.4f}  {v.signal.value:<6}{v.weight:>8.3f}"
                f"{v.normalized_weight:>8.3f}  {v.model_name:<12}{v.model_version:>4}"
                f"{v.latency_seconds * 1000:>8.1f}ms"
            )
            if v.left_out:
                lines.append(f"    {v.server_name} {v.left_out}")
    voted = len(result.voters)
    lines.append(
        f"{voted} of {voted + len(result.missing)} servers voted in "
        f"{result.duration_seconds * 1000:.1f} ms ({result.weight_mode} weights); "
        f"missing: {describe_missing(result.missing)}"
    )
    return "\n".join(lines)


def describe_missing(missing: Sequence[Missing]) -> str:
    """``model_2 (UNAVAILABLE: connection lost ...), model_4 (NOT_SERVING: ...)``."""
    if not missing:
        return "none"
    return ", ".join(f"{m.server_name} ({m.reason.value}: {m.message})" for m in missing)
