"""What a trade outcome must be, checked the same way by the model server's Feedback and by the
coordinator's (which refuses at once what a server would refuse later, so nothing it
acknowledges is lost on the way).

Plain values, not protobufs: the server's feedback loop calls these with the request's fields,
the coordinator with its ``TradeOutcome``'s. Each raises
:class:`~xylen_server.errors.InvalidArgument` with a stable reason and a bounded message.
"""

from __future__ import annotations

import math

from xylen_server.errors import InvalidArgument

EARLIEST_CLOSE_TIME_S = 946_684_800
"""2000-01-01T00:00:00Z: an outcome closed before it is a mistake (no market this server
learns from traded then; Binance opened in 2017)."""

SIDE_LONG = 1
"""``xylen.v1.TradeSide.TRADE_SIDE_LONG``."""
SIDE_SHORT = 2
"""``xylen.v1.TradeSide.TRADE_SIDE_SHORT``."""


def check_prediction_id(prediction_id: str, max_bytes: int) -> None:
    """Present and at most ``max_bytes`` (``FEEDBACK_MAX_ID_BYTES``) in UTF-8."""
    if not prediction_id:
        raise InvalidArgument("prediction_id is required", reason="MISSING_PREDICTION_ID")
    size = len(prediction_id.encode())
    if size > max_bytes:
        raise InvalidArgument(
            f"prediction_id is {size} bytes, longer than FEEDBACK_MAX_ID_BYTES ({max_bytes})",
            reason="PREDICTION_ID_TOO_LONG",
            limit=max_bytes,
            size=size,
        )


def check_finite(name: str, value: float) -> None:
    """``outcome.<name>`` is a finite number."""
    if not math.isfinite(value):
        raise InvalidArgument(
            f"outcome.{name} must be finite, got {value}", reason="INVALID_OUTCOME", field=name
        )


def check_side(side: int) -> None:
    """Unset, LONG or SHORT."""
    if side not in (0, SIDE_LONG, SIDE_SHORT):
        raise InvalidArgument(
            f"outcome.side {side} is not a TradeSide (1 LONG, 2 SHORT)",
            reason="INVALID_OUTCOME",
            field="side",
        )


def close_time_ms(close_time: tuple[int, int] | None, latest_ms: int) -> int:
    """``close_time`` (``(seconds, nanos)`` since the epoch, as ``google.protobuf.Timestamp``
    carries them; None when unset) in UTC ms: from :data:`EARLIEST_CLOSE_TIME_S` to
    ``latest_ms`` (now plus the allowed clock skew)."""
    if close_time is None:
        raise InvalidArgument(
            "outcome.close_time is required", reason="INVALID_OUTCOME", field="close_time"
        )
    seconds, nanos = close_time
    if not 0 <= nanos < 1_000_000_000:
        raise InvalidArgument(
            f"outcome.close_time.nanos must lie in [0, 999999999], got {nanos}",
            reason="INVALID_OUTCOME",
            field="close_time",
        )
    if seconds < EARLIEST_CLOSE_TIME_S:
        raise InvalidArgument(
            f"outcome.close_time ({seconds} s since the epoch) is before 2000-01-01",
            reason="INVALID_OUTCOME",
            field="close_time",
        )
    close_ms = seconds * 1000 + nanos // 1_000_000
    if close_ms > latest_ms:
        raise InvalidArgument(
            f"outcome.close_time ({seconds} s since the epoch) is in the future",
            reason="OUTCOME_IN_FUTURE",
            field="close_time",
        )
    return close_ms


def underlying_move(
    *, realized_return: float, side: int, underlying_log_return: float | None
) -> float:
    """The underlying's log return over the model's horizon, as a trade's outcome gives it: the
    one reading the server's Feedback labels and the coordinator's adaptive weights score.

    ``underlying_log_return`` when the outcome carries it (exact: the same number training
    computes from the candles). An outcome without it (a client from before the field) gives it
    through its ``side``: a LONG's ``realized_return`` is the underlying's simple return, a
    SHORT's its negation, read as before fees and over the horizon, so a profitable short is a
    down move. With neither there is no way to know whether the price rose: INVALID_ARGUMENT
    ``MISSING_UNDERLYING_MOVE`` naming both fields.
    """
    check_side(side)
    if underlying_log_return is not None:
        check_finite("underlying_log_return", underlying_log_return)
        return underlying_log_return
    if side:
        simple = realized_return if side == SIDE_LONG else -realized_return
        if simple <= -1.0:
            raise InvalidArgument(
                f"outcome.realized_return {realized_return:g} of a "
                f"{'long' if side == SIDE_LONG else 'short'} trade would be a price at or below "
                "zero; send outcome.underlying_log_return",
                reason="INVALID_OUTCOME",
                field="realized_return",
            )
        return math.log1p(simple)
    raise InvalidArgument(
        "outcome.underlying_log_return (or outcome.side with realized_return) is required: "
        "the trade's return alone does not say whether the price rose",
        reason="MISSING_UNDERLYING_MOVE",
        field="underlying_log_return",
    )
