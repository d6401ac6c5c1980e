"""The synchronous face of the library: :class:`Coordinator`.

It runs an :class:`~xylen_coordinator.coordinator.AsyncCoordinator` on its own event loop in a
background thread, so plain (non-asyncio) code gets the same fan-out, ensemble and feedback
queue in-process, without a coordinator server::

    with Coordinator("config.yaml") as coordinator:
        result = coordinator.predict([window])
        print(result.decision.signal, [v.server_name for v in result.decision.votes])
        coordinator.feedback(result.decision.prediction_id, realized_return=0.004)

Methods are safe to call from several threads at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator.config import Config
from xylen_coordinator.coordinator import AsyncCoordinator
from xylen_coordinator.results import EndpointState, EnsembleResult, FeedbackAck

T = TypeVar("T")


class Coordinator:
    """Blocking wrapper around :class:`AsyncCoordinator` (see there for each method)."""

    def __init__(self, config: Config | str | Path, *, wait_seconds: float = 3.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="xylen-coordinator", daemon=True
        )
        self._thread.start()
        try:
            self.aio: AsyncCoordinator = self._call(self._start(config, wait_seconds))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _start(config: Config | str | Path, wait_seconds: float) -> AsyncCoordinator:
        return await AsyncCoordinator(config).start(wait_seconds)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def config(self) -> Config:
        return self.aio.config

    def predict(
        self,
        inputs: Sequence[pb.PredictInput] | pb.PredictRequest,
        timeout: float | None = None,
    ) -> EnsembleResult:
        """One weighted ensemble decision per input row."""
        return self._call(self.aio.predict(inputs, timeout))

    def feedback(
        self,
        prediction_id: str,
        outcome: pb.TradeOutcome | None = None,
        *,
        pnl: float = 0.0,
        realized_return: float | None = None,
        close_time: datetime | None = None,
        side: int = 0,
        underlying_log_return: float | None = None,
    ) -> FeedbackAck:
        """Record a trade outcome durably and queue it for the servers that voted."""
        return self._call(
            self.aio.feedback(
                prediction_id,
                outcome,
                pnl=pnl,
                realized_return=realized_return,
                close_time=close_time,
                side=side,
                underlying_log_return=underlying_log_return,
            )
        )

    def reload(self, config: Config | str | Path | None = None) -> Config:
        """Swap in a new configuration (default: re-read the file)."""
        return self._call(self.aio.reload(config))

    def endpoints(self) -> list[EndpointState]:
        """Every configured endpoint with its health and weight."""
        return self._call(_value(self.aio.endpoints))

    def wait_serving(self, names: Sequence[str] | None = None, timeout: float = 30.0) -> bool:
        """Wait until the named endpoints (default: all enabled) are SERVING."""
        return self._call(self.aio.wait_serving(names, timeout))

    def model_infos(self, timeout: float = 2.0) -> dict[str, pb.ModelInfo]:
        """GetModelInfo of every serving endpoint."""
        return self._call(self.aio.model_infos(timeout))

    def pending_feedback(self) -> int:
        """Outcomes not yet delivered to every target."""
        return self._call(self.aio.pending_feedback())

    def delivery_states(self, prediction_id: str) -> dict[str, tuple[str, int, str]]:
        """Server name -> (state, attempts, last error) of one outcome's deliveries."""
        return self._call(self.aio.delivery_states(prediction_id))

    def sweep_outbox(self, now: float | None = None) -> dict[str, int]:
        """Delete what is older than the retention from the outbox now; rows by table."""
        return self._call(self.aio.sweep_outbox(now))

    def close(self) -> None:
        """Close the channels and the outbox, then stop the background loop."""
        if self._loop.is_closed():
            return
        try:
            self._call(self.aio.close(), timeout=30)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _value(fn: Any) -> Any:
    return fn()
