"""Rows for a coordinator's outbox, written with chosen timestamps, and the waits and refusals
the outbox tests share (``test_outbox_retention``, ``test_outbox_lifecycle``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator.outbox import Outbox, PredictionRecord

DAY = 86400.0


def prediction_row(created: float, servers: tuple[str, ...] = ("m1", "m2")) -> PredictionRecord:
    """An ensemble prediction made at ``created`` that each of ``servers`` voted BUY on."""
    return PredictionRecord("BUY", {s: (f"{s}-x", 0.7) for s in servers}, created)


def outcome_bytes() -> bytes:
    """A serialized long trade's outcome that closed a minute ago."""
    outcome = pb.TradeOutcome(realized_return=0.01, side=pb.TradeSide.TRADE_SIDE_LONG)
    outcome.close_time.FromSeconds(int(time.time()) - 60)
    return outcome.SerializeToString()


class Prepared:
    """Writes rows into an outbox file with chosen timestamps: through an Outbox of its own (the
    file's one owner meanwhile), or a running coordinator's ``outbox``, on its thread."""

    def __init__(self, path: Path | None = None, outbox: Outbox | None = None) -> None:
        self.owned = outbox is None
        self.outbox = Outbox(path) if outbox is None else outbox  # type: ignore[arg-type]

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.outbox._executor.submit(fn, *args).result()

    def predictions(self, rows: list[tuple[str, float, PredictionRecord]]) -> None:
        self.call(self.outbox.write_predictions, rows)

    def outcome(
        self, pid: str, record: PredictionRecord, received: float, states: dict[str, str]
    ) -> None:
        """An outcome for ``pid`` received at ``received``, its deliveries left in ``states``
        (server -> pending, delivered or failed)."""
        self.predictions([(pid, record.created, record)])
        assert self.call(
            self.outbox.enqueue, pid, outcome_bytes(), record, tuple(states), received, received
        )
        for delivery in self.call(self.outbox.due, time.time() + 1e9, 10**6):
            if delivery.prediction_id == pid and states[delivery.server_name] != "pending":
                state = states[delivery.server_name]
                self.call(self.outbox.settle, [(delivery, state, None, "")])

    def close(self) -> None:
        if self.owned:
            self.call(self.outbox._close)
            self.outbox._executor.shutdown()


def wait_until(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Until ``check()`` is true; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str]:
    """The status code, message and ErrorInfo reason ("" if none) ``call()`` fails with."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
    reason = ""
    for detail in status.details if status is not None else ():
        errinfo = error_details_pb2.ErrorInfo()
        if detail.Unpack(errinfo):
            reason = errinfo.reason
    return info.value.code(), info.value.details(), reason  # type: ignore[attr-defined]
