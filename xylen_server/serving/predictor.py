"""The prediction path: the served model, where inference runs, signals and ids.

Inference runs on the engine's worker threads, except a request of a few feature vectors whose
measured cost fits ``Settings.loop_budget_us``: handing 12 us of work to a thread costs ~80 us
and halves throughput, so the loop does it itself. Such requests are batched dynamically
(:class:`_LoopBatch`): those that reach the loop's session while the loop is busy share one
inference (at most :data:`LOOP_BATCH_MAX_ROWS` rows), run at the first turn of the loop with
nothing else to do, so a busy server pays an inference call's fixed cost once per batch instead
of once per request. A request reaching an idle loop (no batch waiting, nothing else due in
this turn) is answered where it stands, without a batch, a future or another turn of the loop;
one row of feature values the engine takes as they are goes from the request to the answer in
Python floats (:meth:`Predictor._alone_value`), bit for bit the matrix path's answer.

An answer is handed to :attr:`Predictor.on_answer` (the prediction log, the inference metrics)
in the loop's next turn, so grpc sends the answer first (a traced call's at once, inside its
``log`` span). Whatever reaches the loop after the answer went out (a Feedback for it above
all) runs after that hand-over, as asyncio runs callbacks in the order they were scheduled.

The served model is one reference, read once per request, so a hot swap (replacing the
reference) never changes the model under a request that already started: every row of a batch
is answered by the same version. A request that leaves the event loop for a worker thread counts
itself in its model's ``inflight`` (plain integer arithmetic on the loop thread, no lock) until
its inference has ended, also when its call was cancelled while the worker ran it; a request
waiting in a loop batch counts itself the same way until its batch has run; and
:meth:`Predictor.swap` closes the replaced model only once that count is back at zero.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from training.calibration import apply as calibrate
from training.calibration import apply_one as calibrate_one
from training.metadata import model_input
from xylen.v1 import model_service_pb2 as pb
from xylen_server import telemetry
from xylen_server.errors import SHOWN_CHARS, DeadlineExceeded, NotFound, Unavailable, shown
from xylen_server.loops import LoopCache
from xylen_server.serving.inputs import feature_rows, feature_values
from xylen_server.serving.model_store import LoadedModel
from xylen_server.settings import Settings
from xylen_server.signals import TO_PROTO, signal_for, signal_numbers

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Result:
    """Probabilities for one batch and the model that computed them (built once per call with
    positional fields; not frozen, since a frozen dataclass sets each field through
    ``object.__setattr__``, and nothing changes a Result after it is returned)."""

    model: LoadedModel
    probabilities: np.ndarray | list[float]
    """Calibrated P(up) per row, float64 (the engine's output through the model's
    ``calibration``; :mod:`training.calibration`); a list of Python floats for a row answered
    alone from its values (:meth:`Predictor._alone_value`) and for a member of a loop batch
    (a slice of the run's answers)."""
    signals: list[int]
    """``xylen.v1.Signal`` number per row, from the thresholds (:mod:`xylen_server.signals`)."""
    prediction_ids: list[str]
    seconds: float
    rows: np.ndarray | list[float]
    """The float32 feature matrix the model ran on (kept by the prediction log), or the one
    row's values as a list of floats when it went to the engine from them, alone or in a loop
    batch (the float32 values the model ran on are exactly these rounded)."""
    waited: float = 0.0
    """Seconds the batch waited for a worker thread (and its session); 0 on the loop."""
    on_loop: bool = False
    """True when the batch ran on the event loop's own session, not the pool's."""
    raw_probabilities: np.ndarray | list[float] | None = None
    """The engine's P(up) before calibration (the same values when the model has none)."""

    def feature_matrix(self) -> np.ndarray:
        """:attr:`rows` as the float32 (rows, width) matrix the model ran on (a list of one
        row's values rounded to float32, as the engine's buffer did)."""
        rows = self.rows
        if isinstance(rows, np.ndarray):
            return rows
        return np.array([rows], dtype=np.float32)


class _Served:
    """The served model and the requests still running on it off the loop."""

    __slots__ = ("drained", "inflight", "model")

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.inflight = 0
        self.drained: asyncio.Event | None = None  # set by swap() once the model is replaced

    def leave(self, requests: int = 1) -> None:
        self.inflight -= requests
        if self.inflight == 0 and self.drained is not None:
            self.drained.set()


def _leave_when_done(
    work: concurrent.futures.Future[Any], served: _Served, loop: asyncio.AbstractEventLoop
) -> None:
    """Release ``served`` on ``loop`` (where ``inflight`` is counted) once ``work`` ends."""

    def done(_: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to drain
            loop.call_soon_threadsafe(served.leave)

    work.add_done_callback(done)


LOOP_BATCH_MAX_TURNS = 16
"""Most turns of a busy event loop a batch waits for more requests before it runs."""
LOOP_BATCH_MAX_ROWS = 64
"""Most rows in one inference of a loop batch; a larger batch runs in several."""


class _LoopBatch:
    """Requests gathered on the event loop for one inference (see :meth:`Predictor._batched`).

    Each request's own inference call costs a fixed part (onnxruntime's call, and releasing and
    retaking the GIL) plus the walk of every tree from memory that other work has evicted from
    the CPU caches: under load a one-row run cost ~75 us of CPU where a hot loop measures 14
    (the extra ~5 us a row of a batch shares that walk). So requests that arrive together run
    together, as Triton's dynamic batcher does, without a delay of their own: the batch runs
    at the first turn of the loop that has nothing else to do.
    """

    __slots__ = (
        "again",
        "answers",
        "blocks",
        "featurised",
        "loop",
        "owners",
        "rows",
        "sizes",
        "turns",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        """The running loop (asking asyncio for it costs a ``getpid`` system call each time)."""
        self.owners: list[_Served] = []
        self.blocks: list[np.ndarray | list[float]] = []
        """Each request's validated rows: a float64 matrix (``model_input`` runs once per
        run), or one row's values as a list of floats the model takes as they are
        (:func:`~xylen_server.serving.inputs.feature_values`)."""
        self.sizes: list[int] = []
        """Each request's number of rows (1 for a list of values)."""
        self.featurised: list[float] = []
        self.answers: list[asyncio.Future[Result]] = []
        self.rows = 0
        self.turns = 1
        """Turns of the loop the batch has waited so far."""
        self.again: asyncio.Handle | None = None
        """The loop's handle that runs the batch's check (:meth:`Predictor._run_batch`): on
        asyncio's own loop it is put back on the loop's ready queue to wait one more turn,
        where ``call_soon`` would build a new handle each turn (five Python calls)."""

    def add(
        self, served: _Served, rows: np.ndarray | list[float], featurised: float
    ) -> asyncio.Future[Result]:
        answer: asyncio.Future[Result] = self.loop.create_future()
        self.owners.append(served)
        self.blocks.append(rows)
        size = 1 if rows.__class__ is list else len(rows)
        self.sizes.append(size)
        self.featurised.append(featurised)
        self.answers.append(answer)
        self.rows += size
        return answer

    def matrix(self, members: list[int]) -> np.ndarray:
        """The float32 matrix of ``members``' rows, as the engines take it: one conversion of
        the lists of values (which :func:`~training.metadata.model_input` would leave as they
        are, rounded to float32 alike), else ``model_input`` of all the rows together."""
        blocks = [self.blocks[i] for i in members]
        if all([block.__class__ is list for block in blocks]):  # a list: no generator's frame
            return np.array(blocks, dtype=np.float32)
        if len(blocks) == 1:
            return model_input(cast(np.ndarray, blocks[0]))  # not a list: the test above
        return model_input(np.concatenate([np.atleast_2d(block) for block in blocks]))

    def runs(self) -> list[tuple[LoadedModel, list[int]]]:
        """The requests still waiting (a cancelled caller's rows are not run), grouped into runs
        of one model and at most :data:`LOOP_BATCH_MAX_ROWS` rows."""
        runs: list[tuple[LoadedModel, list[int]]] = []
        current: _Served | None = None
        size = 0
        members = zip(self.owners, self.answers, self.sizes, strict=True)
        for index, (served, answer, rows) in enumerate(members):
            if answer.done():
                continue
            if served is not current or size + rows > LOOP_BATCH_MAX_ROWS:
                runs.append((served.model, []))
                current, size = served, 0
            runs[-1][1].append(index)
            size += rows
        return runs


def check_model_name(requested: str, served: str) -> None:
    """A request naming a model must name the one this server serves (empty: any)."""
    if requested and requested != served:
        raise NotFound(
            f"model {shown(requested)} is not served here; this server serves {served!r}",
            reason="MODEL_NOT_FOUND",
            model_name=requested[:SHOWN_CHARS],
        )


class Predictor:
    """Holds the served model and runs batches on its engine's worker threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._served: _Served | None = None
        # Unique across restarts (random prefix) and cheap per row (a counter).
        self._id_prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)
        self.on_answer: Callable[[Result], None] | None = None
        """Called with every answered batch (the prediction log, the inference metrics), in
        the event loop's next turn (a traced call's at once): see the module's docstring."""
        self.after_the_answer: Callable[[Callable[[Result], None], Result], None] | None = None
        """How :attr:`on_answer` is put off to the loop's next turn: the server's
        :meth:`~xylen_server.api.interceptors.CallInterceptor.after_the_answer`, one callback
        a turn with the calls' metrics (None: ``loop.call_soon``, one callback an answer)."""
        self._batch: _LoopBatch | None = None
        """Requests waiting for this turn's inference on the loop (None: none yet)."""
        self._running_loop = LoopCache().get
        """The running event loop (:mod:`xylen_server.loops`: no system call per ask)."""
        self.loop_runs = 0
        """Inferences run on the loop (each for one or more requests): rows on the loop per
        run tells how much batching does."""
        self.lone_runs = 0
        """Of ``loop_runs``, those run at once for a request that reached an idle loop."""
        self.on_dropped: Callable[[str], None] | None = None
        """Called (on any thread) for each batch dropped unrun: ``"expired"`` when its deadline
        had passed, ``"cancelled"`` when its call was cancelled while it waited for a worker
        (the metrics)."""

    @property
    def model(self) -> LoadedModel:
        served = self._served
        if served is None:
            raise Unavailable("the model is still loading; retry shortly", reason="MODEL_LOADING")
        return served.model

    def model_named(self, name: str) -> LoadedModel:
        """The served model, checking that a request naming a model (non-empty) names it."""
        model = self.model
        check_model_name(name, model.meta.name)
        return model

    @property
    def ready(self) -> bool:
        return self._served is not None

    def install(self, model: LoadedModel) -> LoadedModel | None:
        """Serve ``model`` from now on; returns the model it replaced (still finishing calls:
        close it with :meth:`swap`'s draining, or only once nothing can be using it)."""
        previous, self._served = self._served, _Served(model)
        return None if previous is None else previous.model

    async def swap(self, model: LoadedModel, grace_seconds: float = 30.0) -> LoadedModel | None:
        """Serve the already loaded and warmed ``model`` from this instant (call on the event
        loop), then wait for the requests still running on the replaced model and close it.

        Returns the replaced model (closed), or None when nothing was served before. If its
        requests outlast ``grace_seconds`` it is closed anyway and a warning logged.
        """
        previous, self._served = self._served, _Served(model)
        if previous is None:
            return None
        if previous.inflight:
            previous.drained = asyncio.Event()
            try:
                await asyncio.wait_for(previous.drained.wait(), grace_seconds)
            except TimeoutError:
                logger.warning(
                    "%d requests still on v%d after %.1fs; closing it anyway",
                    previous.inflight,
                    previous.model.meta.version,
                    grace_seconds,
                )
        await asyncio.get_running_loop().run_in_executor(None, previous.model.close)
        return previous.model

    def _drop_if_expired(self, deadline: float | None) -> None:
        """Abandoned work is not done: DEADLINE_EXCEEDED when ``deadline`` (monotonic) passed."""
        if deadline is not None and time.monotonic() >= deadline:
            if self.on_dropped is not None:
                self.on_dropped("expired")
            raise DeadlineExceeded(
                "the call's deadline passed before its inference ran; it was dropped unrun",
                reason="DEADLINE_PASSED_BEFORE_WORK",
            )

    def _run(
        self,
        model: LoadedModel,
        request: pb.PredictRequest,
        on_loop: bool = False,
        deadline: float | None = None,
        submitted: float = 0.0,
        parent: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Validate, featurise and infer; returns P(up), the feature rows, the time it took and
        the time it waited since ``submitted`` (a ``perf_counter`` reading; 0: not queued).
        ``parent`` is the trace context to open the featurise and inference spans under (None:
        tracing off, no span)."""
        self._drop_if_expired(deadline)  # on the worker: it may have waited for a thread
        started = time.perf_counter()
        waited = started - submitted if submitted else 0.0
        if parent is not None:
            return self._run_traced(model, request, on_loop, started, waited, parent)
        rows = self._features(model, request)
        if on_loop:
            probabilities = model.engine.predict_on_loop(rows)
        else:
            if self.settings.inference_delay_ms:
                time.sleep(self.settings.inference_delay_ms / 1000.0)
            probabilities = model.engine.predict_proba(rows)
        return probabilities, rows, time.perf_counter() - started, waited

    def _run_traced(
        self,
        model: LoadedModel,
        request: pb.PredictRequest,
        on_loop: bool,
        started: float,
        waited: float,
        parent: Any,
    ) -> tuple[np.ndarray, np.ndarray, float, float]:
        """:meth:`_run` with a span for each step (tracing on)."""
        tracer = telemetry.tracer(__name__)
        meta = model.meta
        with tracer.start_as_current_span("featurise", context=parent) as span:
            rows = self._features(model, request)
            span.set_attribute("xylen.rows", int(rows.shape[0]))
        with tracer.start_as_current_span("inference", context=parent) as span:
            span.set_attribute("xylen.on_loop", on_loop)
            span.set_attribute("xylen.model_version", meta.version)
            span.set_attribute("xylen.waited_us", round(waited * 1e6, 1))
            if on_loop:
                probabilities = model.engine.predict_on_loop(rows)
            else:
                if self.settings.inference_delay_ms:
                    time.sleep(self.settings.inference_delay_ms / 1000.0)
                probabilities = model.engine.predict_proba(rows)
        return probabilities, rows, time.perf_counter() - started, waited

    def _features(self, model: LoadedModel, request: pb.PredictRequest) -> np.ndarray:
        """The request's validated float32 feature rows for ``model``."""
        return model_input(self._rows(model, request))

    def _rows(self, model: LoadedModel, request: pb.PredictRequest) -> np.ndarray:
        """:meth:`_features` before :func:`~training.metadata.model_input` (float64): a loop
        batch converts all its requests' rows at once."""
        meta = model.meta
        return feature_rows(
            request.inputs,
            len(meta.feature_names),
            meta.lookback,
            self.settings.max_batch_rows,
            model.feature_set,
        )

    def _fits_the_loop(self, model: LoadedModel, request: pb.PredictRequest) -> bool:
        """A few feature vectors of a cheap model cost less on the loop than a thread hop."""
        inputs = request.inputs
        rows = len(inputs)
        if not 0 < rows <= model.loop_max_rows or self.settings.inference_delay_ms:
            return False
        if rows == 1:  # the common case, without a generator
            return inputs[0].HasField("features")
        return all(item.HasField("features") for item in inputs)

    def _batched(
        self, served: _Served, request: pb.PredictRequest
    ) -> Result | asyncio.Future[Result]:
        """Answer a request that fits the loop in a batch with the others reaching this point
        while the loop is busy (:class:`_LoopBatch`). Validated and featurised here, at once (a
        bad row is this caller's error alone); inferred, signalled, given ids and logged with
        the whole batch. Counts itself in ``served.inflight`` until the batch has run, so a
        swap in between waits for it.

        A request reaching an idle loop (no batch waiting, nothing else due in this turn) has
        nobody to wait for: it is answered at once, without a batch, a future or another turn
        of the loop (:meth:`_alone`). Returns the Result then, else the batch's future for it
        (a plain method, not a coroutine: one frame less on every call)."""
        started = time.perf_counter()
        model = served.model
        inputs = request.inputs
        # One row of values the model takes as they are: a list, no numpy (nine calls)
        values = (
            feature_values(inputs[0].features.values, len(model.meta.feature_names))
            if len(inputs) == 1
            else None
        )
        batch = self._batch
        if batch is None:
            loop = self._running_loop()
            if not getattr(loop, "_ready", True):  # asyncio's loop: callbacks due in this turn
                if values is not None and model.engine.takes_values:
                    return self._alone_value(model, values, started, loop)
                return self._alone(model, self._rows(model, request), started, loop)
            rows = self._rows(model, request) if values is None else values  # may refuse
            batch = self._batch = _LoopBatch(loop)
            batch.again = loop.call_soon(self._run_batch)
        else:
            rows = self._rows(model, request) if values is None else values
        served.inflight += 1
        return batch.add(served, rows, time.perf_counter() - started)

    def _alone(
        self, model: LoadedModel, rows: np.ndarray, started: float, loop: asyncio.AbstractEventLoop
    ) -> Result:
        """One request's inference on the loop at once (no other request could join it): the
        same answer and log row as a batch of one, without the batch."""
        rows = model_input(rows)
        raw = model.engine.predict_on_loop(rows)
        result = self._result(model, raw, rows, time.perf_counter() - started, 0.0, True)
        if self.on_answer is not None:
            self._hand_over(loop, result)
        self.loop_runs += 1
        self.lone_runs += 1
        return result

    def _alone_value(
        self,
        model: LoadedModel,
        values: list[float],
        started: float,
        loop: asyncio.AbstractEventLoop,
    ) -> Result:
        """:meth:`_alone` of a row the engine takes as a list of Python floats
        (:func:`~xylen_server.serving.inputs.feature_values`): the same answer, bit for bit,
        in Python floats from the engine's bound buffer to the response, without the arrays
        (numpy calls cost several microseconds each here, where the gRPC work between calls has
        pushed their code out of the caches). The Result holds one-element lists."""
        raw = model.engine.predict_value(values)
        probability = calibrate_one(model.meta.calibration, raw)
        thresholds = model.thresholds
        result = Result(
            model,
            [probability],
            [TO_PROTO[signal_for(probability, thresholds.buy, thresholds.sell)]],
            [f"{self._id_prefix}-{next(self._counter):x}"],
            time.perf_counter() - started,
            values,
            0.0,
            True,
            [raw],
        )
        if self.on_answer is not None:
            self._hand_over(loop, result)
        self.loop_runs += 1
        self.lone_runs += 1
        return result

    def _hand_over(self, loop: asyncio.AbstractEventLoop, result: Result) -> None:
        """``result`` to :attr:`on_answer` in the loop's next turn."""
        assert self.on_answer is not None
        if self.after_the_answer is None:
            loop.call_soon(self.on_answer, result)
        else:
            self.after_the_answer(self.on_answer, result)

    def _run_batch(self) -> None:
        """Run the batch in the first turn of the loop that has nothing else ready to run (or
        after :data:`LOOP_BATCH_MAX_TURNS` turns, or once it holds :data:`LOOP_BATCH_MAX_ROWS`
        rows): while the loop is busy, requests on their way (grpc takes up one new call per
        turn) join it; on an idle loop it runs at once."""
        batch = self._batch
        if batch is None:
            return
        ready = getattr(batch.loop, "_ready", None)  # asyncio's loop: callbacks due this turn
        if batch.turns < LOOP_BATCH_MAX_TURNS and batch.rows < LOOP_BATCH_MAX_ROWS and ready:
            batch.turns += 1
            ready.append(batch.again)  # what call_soon does, with the handle it built before
            return
        self._batch = None
        try:
            for model, members in batch.runs():
                self._answer_run(batch, model, members)
        finally:
            owners = batch.owners
            if owners and owners.count(owners[0]) == len(owners):  # one model's: one leave
                owners[0].leave(len(owners))
            else:
                for served in owners:
                    served.leave()

    def _answer_run(self, batch: _LoopBatch, model: LoadedModel, members: list[int]) -> None:
        """One inference for ``members`` of ``batch``; the run is logged as one batch (one
        prediction-log append, one execution in the metrics) and each member gets its rows."""
        started = time.perf_counter()
        try:
            rows = batch.matrix(members)
            raw = model.engine.predict_on_loop(rows)
            seconds = time.perf_counter() - started
            featurised = sum([batch.featurised[i] for i in members])
            run = self._result(model, raw, rows, featurised + seconds, 0.0, True)
            # Each member's answer in Python floats: a list's slice, not four numpy views
            probabilities, raws = cast(np.ndarray, run.probabilities).tolist(), raw.tolist()
        except Exception as exc:  # every member of the run has the error
            for i in members:
                batch.answers[i].set_exception(exc)
            return
        self.loop_runs += 1
        blocks, answers, signals, ids = batch.blocks, batch.answers, run.signals, run.prediction_ids
        sizes = batch.sizes
        offset = 0
        for i in members:
            block = blocks[i]
            end = offset + sizes[i]
            answers[i].set_result(
                Result(
                    model,
                    probabilities[offset:end],
                    signals[offset:end],
                    ids[offset:end],
                    batch.featurised[i] + seconds,
                    block if block.__class__ is list else rows[offset:end],
                    0.0,
                    True,
                    raws[offset:end],
                )
            )
            offset = end
        if self.on_answer is not None:  # after the members' wake-ups: they answer first
            self._hand_over(batch.loop, run)

    def _result(
        self,
        model: LoadedModel,
        raw: np.ndarray,
        rows: np.ndarray,
        seconds: float,
        waited: float,
        on_loop: bool,
    ) -> Result:
        """The answer to ``rows`` from the engine's ``raw`` P(up): calibrated, signalled (the
        thresholds are on the calibrated scale) and given ids."""
        counter, prefix = self._counter, self._id_prefix
        if len(raw) == 1:  # the common case, without a comprehension's frame
            ids = [f"{prefix}-{next(counter):x}"]
        else:
            ids = [f"{prefix}-{next(counter):x}" for _ in range(len(raw))]
        calibrated = calibrate(model.meta.calibration, raw)
        thresholds = model.thresholds
        signals = signal_numbers(calibrated.tolist(), thresholds.buy, thresholds.sell)
        return Result(model, calibrated, signals, ids, seconds, rows, waited, on_loop, raw)

    async def predict(
        self, request: pb.PredictRequest, deadline: float | None = None, parent: Any = None
    ) -> Result:
        """Answer one Predict request on the served model, off the event loop. Work whose
        ``deadline`` (``time.monotonic``) has passed is dropped before the thread hop and
        again before inference (DEADLINE_EXCEEDED). ``parent`` is the trace context to open
        the featurise, inference and log spans under (None: no spans; the caller reads the
        one tracing flag, so a server built without trace hooks reads none)."""
        answer = self.answer(request, deadline, parent)
        return answer if answer.__class__ is Result else await answer  # type: ignore[misc]

    def answer(
        self, request: pb.PredictRequest, deadline: float | None = None, parent: Any = None
    ) -> Result | Awaitable[Result]:
        """:meth:`predict` without a coroutine of its own where none is needed: the Result of
        a request answered at once, else what to await for it (a loop batch's future, or the
        coroutine of the rest of the work). Refusals are raised here, at once."""
        served = self._served
        if served is None:
            raise Unavailable("the model is still loading; retry shortly", reason="MODEL_LOADING")
        model = served.model
        if request.model_name:
            check_model_name(request.model_name, model.meta.name)
        if deadline is not None:
            self._drop_if_expired(deadline)
        on_loop = self._fits_the_loop(model, request)
        if on_loop and parent is None:
            return self._batched(served, request)
        return self._predict_off_batch(served, request, on_loop, deadline, parent)

    async def _predict_off_batch(
        self,
        served: _Served,
        request: pb.PredictRequest,
        on_loop: bool,
        deadline: float | None,
        parent: Any,
    ) -> Result:
        """A traced request on the loop, or any request on a worker thread."""
        model = served.model
        if on_loop:
            probabilities, rows, seconds, waited = self._run(
                model, request, True, None, 0.0, parent
            )
        else:
            served.inflight += 1
            work = model.engine.executor.submit(
                self._run, model, request, False, deadline, time.perf_counter(), parent
            )
            worker_holds = False
            try:
                probabilities, rows, seconds, waited = await asyncio.wrap_future(work)
            except asyncio.CancelledError:
                # The call was cancelled (its caller left or its deadline passed): work not yet
                # started is dropped; cancel() is False only when it is running already, and
                # then the worker keeps the model held until it is done (a swap must not close
                # a model a worker thread is still running).
                if work.cancel():
                    if self.on_dropped is not None:
                        self.on_dropped("cancelled")
                elif not work.done():
                    worker_holds = True
                    _leave_when_done(work, served, asyncio.get_running_loop())
                raise
            finally:
                if not worker_holds:
                    served.leave()
        result = self._result(model, probabilities, rows, seconds, waited, on_loop)
        if self.on_answer is not None:
            if parent is None:
                self._hand_over(self._running_loop(), result)
            else:
                with telemetry.tracer(__name__).start_as_current_span("log", context=parent):
                    self.on_answer(result)
        return result

    async def predict_within(
        self,
        request: pb.PredictRequest,
        seconds: float,
        deadline: float | None = None,
        parent: Any = None,
    ) -> Result:
        """:meth:`predict` within ``seconds`` (0: no limit of its own); DEADLINE_EXCEEDED
        (reason ITEM_DEADLINE_EXCEEDED) when it runs out. ``deadline`` and ``parent`` as for
        :meth:`predict`."""
        if seconds <= 0:
            return await self.predict(request, deadline, parent)
        try:
            return await asyncio.wait_for(self.predict(request, deadline, parent), seconds)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the item exceeded its {seconds * 1000:.0f} ms timeout",
                reason="ITEM_DEADLINE_EXCEEDED",
            ) from None
