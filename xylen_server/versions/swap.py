"""Changing the served model while serving: promotion, rollback and reload, one hot swap.

Every change goes the same way: the new model is loaded, converted, parity-checked and warmed
beside the serving one (:func:`~xylen_server.serving.model_store.load_model` on a worker
thread), its files are made the serving directory on disk (atomic rename), and only then
:meth:`Predictor.swap` replaces the reference in one step on the event loop. Requests that
started on the old model finish on it; the old engine is closed once they have. Health stays
SERVING throughout, and GetModelInfo reports the new version from the instant of the swap.

One change at a time (an asyncio lock); a model that fails to load changes nothing. The
change's own CPU in this process (the load, the history's file work) is paced to
``MODEL_LOAD_CPU_SHARE`` of one core (:class:`~xylen_server.serving.pacing.CpuShare`): a swap
takes longer and Predict keeps the cores.

While a change runs, :class:`LoopLag` watches the event loop: a timer due every 5 ms records
how late it runs. The worst lateness of each swap is kept (:attr:`ModelManager.loop_lag_ms`) and
logged with the swap, so a step that holds the loop (or starves it of CPU) shows up as a number,
not as a p99 nobody can attribute (``python -m bench swaps`` prints it).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

from training.metadata import MetadataError, ModelMetadata
from xylen_server.errors import (
    FailedPrecondition,
    HistoryError,
    ModelLoadError,
    VersionNotFound,
)
from xylen_server.serving.model_store import LoadedModel, load_model
from xylen_server.serving.pacing import CpuShare
from xylen_server.serving.predictor import Predictor
from xylen_server.settings import Settings
from xylen_server.versions import history as model_history

logger = logging.getLogger(__name__)


class ServingModelChanged(FailedPrecondition):
    """A candidate was gated against a model that is no longer the one served (a reload or a
    restore replaced it during the job): it is not promoted over a model it was never
    compared with."""


class LoopLag:
    """How late the event loop runs a timer due every :attr:`PERIOD`, while the ``async
    with`` block runs: :attr:`worst` seconds at most. A step that holds the loop (or the GIL,
    or takes the loop's CPU) for ``d`` seconds shows as lateness of at least ``d - PERIOD``; a
    loop that is merely busy serving shows as its longest callback; a stall shorter than the
    period may show as less (lateness <= stall <= lateness + PERIOD). Each wake-up of the loop
    costs CPU (measured ~70-130 us on these VMs: a 1 ms probe took 44 ms of CPU a second, as
    much as the swap's own steps in this process; 5 ms takes ~15-25 ms a second), so the period
    is 5 ms and the probe runs only while a change does."""

    PERIOD = 0.005

    def __init__(self) -> None:
        self.worst = 0.0
        self.steps: dict[str, list[float]] = {}
        """Per step of the change (:meth:`step`), in order: ``[seconds, worst lateness]``. A
        late tick counts for the step running when the tick finally ran, so a stall at the end
        of one step may be booked on the next."""
        self._step = "start"
        self._step_started = time.perf_counter()
        self.began = self._step_started
        """When the change began (``time.perf_counter``: CLOCK_MONOTONIC on Linux, the clock a
        client on the same host reads too), so a step's span can be laid beside other events:
        each step starts where the previous one's seconds end."""
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def step(self, name: str) -> None:
        """The change enters step ``name`` (callable from any thread: the load's steps run on
        a worker thread)."""
        now = time.perf_counter()
        with self._lock:
            record = self.steps.setdefault(self._step, [0.0, 0.0])
            record[0] += now - self._step_started
            self._step, self._step_started = name, now
            self.steps.setdefault(name, [0.0, 0.0])

    def summary(self) -> str:
        """``step seconds/worst-lateness-ms`` for every step so far, e.g. ``reference
        0.61s/3.2ms``."""
        self.step(self._step)  # book the running step's time so far
        with self._lock:
            return ", ".join(
                f"{name} {seconds:.3f}s/{late * 1e3:.1f}ms"
                for name, (seconds, late) in self.steps.items()
            )

    def _tick(self, due: float) -> None:
        assert self._loop is not None
        now = self._loop.time()
        late = now - due
        self.worst = max(self.worst, late)
        with self._lock:
            record = self.steps.setdefault(self._step, [0.0, 0.0])
            record[1] = max(record[1], late)
        self._timer = self._loop.call_at(now + self.PERIOD, self._tick, now + self.PERIOD)

    async def __aenter__(self) -> LoopLag:
        self._loop = asyncio.get_running_loop()
        due = self._loop.time() + self.PERIOD
        self._timer = self._loop.call_at(due, self._tick, due)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()


class ModelManager:
    """The served model's lifecycle: initial load, promotion, rollback, reload."""

    def __init__(self, settings: Settings, predictor: Predictor) -> None:
        self.settings = settings
        self.predictor = predictor
        self.history = settings.history_dir
        self.lock = asyncio.Lock()
        self.swaps: Counter[str] = Counter()
        """Swaps done, by kind: ``promoted``, ``rolled_back``, ``reloaded`` (the metrics)."""
        self.on_change: list[Callable[[LoadedModel], Awaitable[None]]] = []
        """Awaited on the loop after every swap with the model now served."""
        self.loop_lag_ms: deque[float] = deque(maxlen=100)
        """The event loop's worst lateness (ms) during each of the last 100 swaps, from the
        start of the new version's load until the old one is closed (:class:`LoopLag`)."""

    async def _thread(self, fn: Callable[..., object], *args: object) -> object:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _paced(self, pacer: CpuShare, fn: Callable[..., object], *args: object) -> object:
        """``fn(*args)`` on a worker thread, its CPU charged to the change's ``pacer`` (and
        paced after it): the history's file work counts like the load's."""

        def run() -> object:
            with pacer.working():
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(None, run)

    def _pacer(self) -> CpuShare:
        return CpuShare(self.settings.model_load_cpu_share)

    def keep_serving_version(self) -> None:
        """Copy the serving directory into the history (blocking; at start-up)."""
        try:
            model_history.archive(self.settings.model_dir, self.history)
            meta = ModelMetadata.read(self.settings.model_dir)
            model_history.prune(self.history, self.settings.model_history_keep, meta.version)
        except (MetadataError, OSError) as exc:
            logger.warning("could not keep the serving version in %s: %s", self.history, exc)

    async def _swap(
        self, loaded: LoadedModel, why: str, kind: str, lag: LoopLag, pacer: CpuShare
    ) -> None:
        previous = self.predictor.model.meta.version if self.predictor.ready else None
        lag.step("swap")
        await self.predictor.swap(loaded, self.settings.shutdown_grace_seconds)
        self.swaps[kind] += 1  # done: counted even if pruning the history fails below
        lag.step("prune")
        await self._paced(
            pacer,
            model_history.prune,
            self.history,
            self.settings.model_history_keep,
            loaded.meta.version,
        )
        self.loop_lag_ms.append(lag.worst * 1e3)
        logger.info(
            "%s: now serving %s v%d (was v%s); event loop late by at most %.2f ms meanwhile; "
            "load %s (steps, seconds/worst lateness: %s) (began at monotonic %.6f)",
            why,
            loaded.meta.name,
            loaded.meta.version,
            previous,
            lag.worst * 1e3,
            pacer.summary(),
            lag.summary(),
            lag.began,
        )
        for callback in self.on_change:
            await callback(loaded)

    async def promote(
        self, candidate: Path, version: int, parent: int | None = None
    ) -> LoadedModel:
        """Keep the candidate directory as ``version``, load it beside the serving model, make
        it the serving directory and swap. Raises ModelLoadError (nothing changed), and
        :class:`ServingModelChanged` (nothing changed) when ``parent``, the version the
        candidate was gated against, is no longer the one served."""
        async with self.lock, LoopLag() as lag:
            serving = self.predictor.model.meta.version
            if parent is not None and serving != parent:
                raise ServingModelChanged(
                    f"v{serving} replaced v{parent} while the candidate was trained and gated "
                    f"against v{parent}; it is not promoted over a model it was not compared "
                    "with",
                    reason="SERVING_MODEL_CHANGED",
                    serving=serving,
                    parent=parent,
                )
            pacer = self._pacer()
            lag.step("adopt")
            kept = await self._paced(pacer, model_history.adopt, candidate, self.history, version)
            assert isinstance(kept, Path)
            try:
                loaded = await self._thread(load_model, self.settings, kept, lag.step, None, pacer)
            except BaseException:
                shutil.rmtree(kept, ignore_errors=True)
                raise
            assert isinstance(loaded, LoadedModel)
            lag.step("install")
            await self._paced(pacer, model_history.install_serving, kept, self.settings.model_dir)
            await self._swap(loaded, "promoted", "promoted", lag, pacer)
            return loaded

    async def rollback(self, version: int) -> tuple[LoadedModel, int]:
        """Serve the kept ``version`` (0: the serving model's parent, else the newest kept one
        below it). Returns the model now served and the version it replaced."""
        async with self.lock, LoopLag() as lag:
            pacer = self._pacer()
            current = self.predictor.model.meta
            # Reading the history is file work: off the loop like every other step.
            lag.step("history")
            target = await self._paced(
                pacer, model_history.rollback_target, self.history, current, version
            )
            assert isinstance(target, int)
            version = target
            kept = await self._paced(pacer, model_history.find_version, self.history, version)
            assert isinstance(kept, model_history.KeptVersion)
            # The sha256 of each file verified here is handed to the load: hashed once a swap.
            digests: dict[str, str] = {}
            try:
                await self._paced(pacer, model_history.verify_model_dir, kept.path, digests)
            except HistoryError as exc:
                raise VersionNotFound(exc.message, version=version) from exc
            loaded = await self._thread(
                load_model, self.settings, kept.path, lag.step, digests, pacer
            )
            assert isinstance(loaded, LoadedModel)
            lag.step("install")
            await self._paced(
                pacer, model_history.install_serving, kept.path, self.settings.model_dir
            )
            await self._swap(loaded, f"rolled back to v{version}", "rolled_back", lag, pacer)
            return loaded, current.version

    async def reload(self) -> tuple[LoadedModel, bool]:
        """Load the serving directory again if it holds another model (a restore, a rollback
        made offline, a `make train`) and swap to it; returns the served model and whether it
        changed. Raises ModelLoadError (the served model stays)."""
        async with self.lock, LoopLag() as lag:
            pacer = self._pacer()
            current = self.predictor.model
            try:
                try:
                    meta = ModelMetadata.read(self.settings.model_dir)
                except MetadataError as exc:
                    raise ModelLoadError(f"cannot reload: {exc}") from exc
                if (
                    meta.version == current.meta.version
                    and meta.checksums == current.meta.checksums
                ):
                    return current, False
                loaded = await self._thread(load_model, self.settings, None, lag.step, None, pacer)
            except ModelLoadError as exc:
                logger.error(
                    "reload refused, v%d keeps serving: %s", current.meta.version, str(exc)[:500]
                )
                raise
            assert isinstance(loaded, LoadedModel)
            lag.step("archive")
            await self._paced(pacer, self.keep_serving_version)
            await self._swap(loaded, "reloaded", "reloaded", lag, pacer)
            return loaded, True

    async def kept_versions(self) -> list[model_history.KeptVersion]:
        """The kept versions, newest first."""
        kept = await self._thread(model_history.list_versions, self.history)
        assert isinstance(kept, list)
        return kept

    def next_version(self) -> int:
        """The version a new candidate gets (blocking)."""
        return model_history.next_version(self.settings.model_dir, self.history)

    def kept_dir(self, version: int) -> Path:
        """Directory of the kept ``version`` (archiving the serving one first if missing)."""
        path = self.history / str(version)
        if not path.is_dir():
            self.keep_serving_version()
        return path
