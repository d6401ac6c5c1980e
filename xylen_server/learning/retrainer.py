"""Retraining jobs inside the server: one at a time, in a subprocess, promoted through the gate.

:meth:`Retrainer.start` (the Retrain RPC and the automatic triggers) refuses a second job while
one runs (FAILED_PRECONDITION, reason RETRAIN_RUNNING, naming the running job id), then runs the
job as a task on the event loop that does no heavy work itself:

1. the job's spec goes to ``<learning dir>/jobs/<job id>/spec.json``; the job reads the
   feedback store's files itself (no snapshot work in the serving process);
2. training and validating: ``python -m xylen_server.learning.job`` runs the job as a
   subprocess with ``RETRAIN_NICE`` added to its niceness (before its heavy imports) and
   ``RETRAIN_THREADS`` threads (see :mod:`~xylen_server.learning.job`);
   its progress lines become the job's TrainingStatus;
3. the verdict: FAILED (reason in the message; too few samples, one class, a crashed or
   non-finite fit, a timeout), REJECTED (the gate's scores), or SUCCEEDED, after which the
   candidate is promoted through :meth:`ModelManager.promote` (the hot swap) unless it was a
   dry run.

The status (with the gate's verdict) is kept for GetModelInfo and streamed to WatchRetrain, and
written to ``jobs/<job id>/status.json`` beside the job's log. The newest ``RETRAIN_JOBS_KEEP``
job directories are kept (:func:`prune_jobs`, as each job starts).

Automatic triggers (:meth:`Retrainer.check_triggers`, after every stored outcome, and a schedule
task): ``RETRAIN_TRIGGER_NEW_SAMPLES`` new samples, live accuracy over the last
``RETRAIN_ACCURACY_WINDOW`` outcomes below ``RETRAIN_TRIGGER_ACCURACY``, or every
``RETRAIN_SCHEDULE_SECONDS``. After any job the live record starts again, so a refused retrain
is not retried until new evidence arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from training.metadata import history_files, history_missing_message
from xylen.v1 import model_service_pb2 as pb
from xylen_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TrainingDataMissing,
    shown,
)
from xylen_server.learning.feedback import FeedbackLoop, feedback_cutoff_ms
from xylen_server.learning.job import JobSpec
from xylen_server.serving.model_store import LoadedModel
from xylen_server.settings import Settings
from xylen_server.versions.swap import ModelManager, ServingModelChanged

logger = logging.getLogger(__name__)


def prune_jobs(jobs: Path, keep: int, current: str | None = None) -> list[str]:
    """Remove all but the newest ``keep`` job directories under ``jobs`` (``current``, the job
    starting, always stays). Newest by the start time in the name (``job-<UTC second>-<hex>``),
    then by when the job's spec was written (jobs started within one second). Returns the
    names removed; a directory that cannot be removed is logged and left (it never fails a
    job); entries not named ``job-*`` are not touched."""

    def started(name: str) -> tuple[str, int]:
        with contextlib.suppress(OSError):
            return name[4:19], (jobs / name / "spec.json").stat().st_mtime_ns
        return name[4:19], 0

    try:
        with os.scandir(jobs) as entries:
            names = [
                entry.name
                for entry in entries
                if entry.name.startswith("job-") and entry.is_dir(follow_symlinks=False)
            ]
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError):
            logger.warning("retrain jobs in %s not pruned: %s", jobs, exc)
        return []
    older = sorted((name for name in names if name != current), key=started)
    removed = []
    for name in older[: max(0, len(older) - (keep - 1 if current in names else keep))]:
        try:
            shutil.rmtree(jobs / name)
        except OSError as exc:
            logger.warning("retrain job %s not removed: %s", name, exc)
        else:
            removed.append(name)
    return removed


_MODES: dict[int, str] = {
    pb.RETRAIN_MODE_FULL: "full",
    pb.RETRAIN_MODE_INCREMENTAL: "incremental",
}
_MODE_ENUM = {name: value for value, name in _MODES.items()}
_FINAL = (pb.TRAINING_STATE_SUCCEEDED, pb.TRAINING_STATE_FAILED, pb.TRAINING_STATE_REJECTED)


def _now() -> datetime:
    return datetime.now(UTC)


class Retrainer:
    """Runs retraining jobs for one server and keeps their status."""

    def __init__(self, settings: Settings, feedback: FeedbackLoop, models: ModelManager) -> None:
        self.settings = settings
        self.feedback = feedback
        self.models = models
        self.status = pb.TrainingStatus(state=pb.TRAINING_STATE_IDLE)
        self.history: dict[str, pb.TrainingStatus] = {}
        self._task: asyncio.Task[None] | None = None
        self._watchers: set[asyncio.Queue[pb.TrainingStatus]] = set()
        self._schedule: asyncio.Task[None] | None = None
        self._closing = False
        models.on_change.append(self._model_changed)
        feedback.on_stored.append(self.check_triggers)

    # -- state ----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _end(self, state: pb.TrainingState.ValueType, message: str) -> None:
        """The job's final status: ``state`` and why, at the end of its last stage."""
        self._update(state=state, stage="done", message=message, end_time=_now())

    def _update(self, **fields: Any) -> None:
        status = pb.TrainingStatus()
        status.CopyFrom(self.status)
        for name, value in fields.items():
            if name == "gate":
                status.gate.CopyFrom(value)
            elif name in ("start_time", "end_time"):
                getattr(status, name).FromDatetime(value)
            else:
                setattr(status, name, value)
        self.status = status
        self.history[status.job_id] = status
        for queue in list(self._watchers):
            queue.put_nowait(status)

    async def _count_new(self, model: LoadedModel) -> int:
        """The stored samples ``model`` has not seen (off the loop); 0, logged, when the store
        cannot be read (a damaged part): counting them is for the triggers, and a server that
        could not count them had failed to start, or a swap to fail after its model was in
        place, with Predict down for a file only retraining reads."""
        loop = asyncio.get_running_loop()
        cutoff = feedback_cutoff_ms(model.meta)
        try:
            return int(await loop.run_in_executor(None, self.feedback.count_new, cutoff))
        except Exception as exc:
            logger.error(
                "cannot count the feedback samples new to v%d (%s: %s); the new-samples "
                "trigger counts from 0, and a retrain reading the store will say what is wrong",
                model.meta.version,
                type(exc).__name__,
                str(exc)[:300],
            )
            return 0

    async def _model_changed(self, model: LoadedModel) -> None:
        """Any swap (promotion, rollback, reload): count new samples against the new model."""
        self.feedback.reset(await self._count_new(model))

    async def start_up(self, model: LoadedModel) -> None:
        """Count the new samples the serving model has not seen; start the schedule."""
        loop = asyncio.get_running_loop()
        count = await self._count_new(model)
        self.feedback.reset(count)
        if self.settings.retrain_auto and self.settings.retrain_schedule_seconds > 0:
            self._schedule = loop.create_task(self._scheduled())
        logger.info("%d feedback samples are new to v%d", count, model.meta.version)

    # -- starting jobs --------------------------------------------------------------------------

    def start(
        self,
        mode: int = 0,
        min_samples: int = 0,
        dry_run: bool = False,
        trigger: str = "manual",
    ) -> pb.TrainingStatus:
        """Start a job (call on the event loop); returns its first status."""
        if mode != pb.RETRAIN_MODE_UNSPECIFIED and mode not in _MODES:
            raise InvalidArgument(
                f"mode {mode} is not a RetrainMode; use RETRAIN_MODE_FULL, "
                "RETRAIN_MODE_INCREMENTAL, or leave it unset for the configured one",
                reason="INVALID_RETRAIN_MODE",
            )
        if min_samples < 0:
            raise InvalidArgument(
                f"min_samples must not be negative, got {min_samples}",
                reason="INVALID_MIN_SAMPLES",
            )
        if self.running:
            raise FailedPrecondition(
                f"retrain job {self.status.job_id} is still running; one job at a time",
                reason="RETRAIN_RUNNING",
                job_id=self.status.job_id,
            )
        if self.models.lock.locked():
            raise FailedPrecondition(
                "the served model is being changed; retry shortly", reason="MODEL_SWAP_RUNNING"
            )
        self.feedback.require_store()
        required = max(self.settings.retrain_min_samples, min_samples)
        if self.feedback.new_samples < required:
            raise FailedPrecondition(
                f"only {self.feedback.new_samples} new samples since v"
                f"{self.models.predictor.model.meta.version}; need at least {required}",
                reason="NOT_ENOUGH_SAMPLES",
                new_samples=self.feedback.new_samples,
                required=required,
            )
        mode_name = _MODES.get(mode, self.settings.retrain_mode)
        if mode_name == "full":
            self._check_history()
        job_id = f"job-{_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        serving = self.models.predictor.model
        self.status = pb.TrainingStatus()
        self._update(
            state=pb.TRAINING_STATE_RUNNING,
            job_id=job_id,
            message="starting",
            start_time=_now(),
            mode=_MODE_ENUM[mode_name],
            dry_run=dry_run,
            trigger=trigger,
            stage="snapshot",
            serving_version=serving.meta.version,
        )
        self._task = asyncio.get_running_loop().create_task(
            self._run(job_id, mode_name, required, dry_run, serving)
        )
        logger.info("retrain %s started (%s, %s, dry_run=%s)", job_id, trigger, mode_name, dry_run)
        return self.status

    def _check_history(self) -> None:
        """A full retrain needs every training file the serving model's metadata lists
        (FAILED_PRECONDITION TRAINING_HISTORY_MISSING naming the first missing path); the job
        checks again, with the files' checksums, before it trains."""
        serving = self.models.predictor.model
        files = history_files(serving.meta, self.settings.model_dir)
        missing = [f for f in files if not f.exists]
        if missing:
            raise TrainingDataMissing(
                history_missing_message(missing, len(files)), path=str(missing[0].path)[:300]
            )

    async def rollback(self, version: int) -> tuple[LoadedModel, int]:
        """Serve the kept ``version`` again (see :meth:`ModelManager.rollback`), never while a
        retrain job runs (FAILED_PRECONDITION, reason RETRAIN_RUNNING)."""
        if self.running:
            raise FailedPrecondition(
                f"retrain job {self.status.job_id} is running; roll back after it ends",
                reason="RETRAIN_RUNNING",
                job_id=self.status.job_id,
            )
        return await self.models.rollback(version)

    def check_triggers(self) -> None:
        """Start a job if an automatic trigger fires (after each stored outcome)."""
        if not self.settings.retrain_auto or self.running or self._closing:
            return
        trigger = None
        threshold = self.settings.retrain_trigger_new_samples
        if threshold and self.feedback.arrived >= threshold:
            trigger = "new_samples"
        elif self.settings.retrain_trigger_accuracy > 0:
            accuracy = self.feedback.live_accuracy()
            if accuracy is not None and accuracy < self.settings.retrain_trigger_accuracy:
                trigger = "accuracy"
        if trigger is None:
            return
        try:
            self.start(trigger=trigger)
        except FailedPrecondition as exc:
            logger.info("automatic retrain (%s) not started: %s", trigger, exc.message)

    async def _scheduled(self) -> None:
        period = self.settings.retrain_schedule_seconds
        while not self._closing:
            await asyncio.sleep(period)
            if not self.running and self.feedback.arrived > 0:
                try:
                    self.start(trigger="schedule")
                except FailedPrecondition as exc:
                    logger.info("scheduled retrain not started: %s", exc.message)

    # -- the job --------------------------------------------------------------------------------

    async def _run(
        self, job_id: str, mode: str, required: int, dry_run: bool, serving: LoadedModel
    ) -> None:
        loop = asyncio.get_running_loop()
        job_dir = self.settings.learning_dir / "jobs" / job_id
        candidate = self.models.history / f".candidate-{job_id}"
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            await loop.run_in_executor(
                None, prune_jobs, job_dir.parent, self.settings.retrain_jobs_keep, job_id
            )
            samples = self.feedback.require_store().count()
            version = await loop.run_in_executor(None, self.models.next_version)
            serving_dir = await loop.run_in_executor(
                None, self.models.kept_dir, serving.meta.version
            )
            spec = JobSpec(
                job_id=job_id,
                samples=str(self.feedback.require_store().directory),
                serving_dir=str(serving_dir),
                candidate_dir=str(candidate),
                result=str(job_dir / "result.json"),
                mode=mode,
                version=int(version),  # type: ignore[call-overload]
                min_samples=required,
                holdout_fraction=self.settings.retrain_holdout_fraction,
                margin=self.settings.retrain_gate_margin,
                min_auc=self.settings.retrain_gate_min_auc,
                z=self.settings.retrain_gate_z,
                threads=self.settings.retrain_threads,
                nice=self.settings.retrain_nice,
                cutoff_ms=feedback_cutoff_ms(serving.meta),
            )
            spec.write(job_dir / "spec.json")
            self._update(stage="training", samples=samples, message=f"{samples} samples stored")
            result = await self._subprocess(job_dir, spec)
            await self._finish(result, candidate, dry_run)
        except asyncio.CancelledError:
            self._end(
                pb.TRAINING_STATE_FAILED,
                "cancelled: the server is shutting down",
            )
            raise
        except Exception as exc:
            logger.exception("retrain %s failed", job_id)
            self._end(
                pb.TRAINING_STATE_FAILED,
                f"failed: {exc}",
            )
        finally:
            shutil.rmtree(candidate, ignore_errors=True)
            # Whether or not its status can be written (a full disk), the job has ended: the
            # triggers wait for new evidence. (Skipped with the write, every later outcome
            # started another job.)
            self.feedback.job_ended()
            try:
                (job_dir / "status.json").write_text(
                    json_format.MessageToJson(self.status, indent=2) + "\n"
                )
            except OSError as exc:
                logger.error("retrain %s: its status could not be written: %s", job_id, exc)

    async def _subprocess(self, job_dir: Path, spec: JobSpec) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(spec.threads)
        with open(job_dir / "job.log", "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "xylen_server.learning.job",
                str(job_dir / "spec.json"),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
            )
        try:
            await asyncio.wait_for(self._follow(proc), self.settings.retrain_timeout_seconds)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return {
                "status": "failed",
                "message": f"training ran longer than {self.settings.retrain_timeout_seconds:g}s",
            }
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        try:
            result: dict[str, Any] = json.loads(Path(spec.result).read_text())
        except (OSError, ValueError):
            return {
                "status": "failed",
                "message": f"training process exited {proc.returncode} without a result "
                f"(see {job_dir / 'job.log'})",
            }
        return result

    async def _follow(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            try:
                line = json.loads(raw)
                stage, message = str(line["stage"]), str(line["message"])
            except (ValueError, KeyError, TypeError):
                continue
            if stage != "done":
                self._update(stage=stage, message=message)
        await proc.wait()

    async def _finish(self, result: dict[str, Any], candidate: Path, dry_run: bool) -> None:
        if result.get("status") != "ok":
            self._end(
                pb.TRAINING_STATE_FAILED,
                f"failed: {result.get('message', 'unknown error')}; the serving model is untouched",
            )
            return
        verdict = result["gate"]
        gate = pb.GateVerdict(**verdict)
        self._update(gate=gate, samples=int(result.get("samples", 0)))
        if not verdict["passed"]:
            self._end(
                pb.TRAINING_STATE_REJECTED,
                f"rejected: {verdict['reason']}; v{self.status.serving_version} keeps serving",
            )
            return
        version = int(result["candidate_version"])
        if dry_run:
            self._end(
                pb.TRAINING_STATE_SUCCEEDED,
                f"dry run, would promote v{version}: {verdict['reason']}",
            )
            return
        self._update(
            stage="swapping",
            candidate_version=version,
            message=f"loading and swapping to v{version}",
        )
        try:
            loaded = await self.models.promote(candidate, version, self.status.serving_version)
        except ServingModelChanged as exc:
            self._end(
                pb.TRAINING_STATE_REJECTED,
                f"rejected: {exc.message}; v{exc.metadata['serving']} keeps serving",
            )
            return
        self._end(
            pb.TRAINING_STATE_SUCCEEDED,
            f"promoted v{loaded.meta.version}: {verdict['reason']}",
        )

    # -- watching -------------------------------------------------------------------------------

    async def watch(self, job_id: str = "") -> AsyncIterator[pb.TrainingStatus]:
        """The job's status now and after every change, ending with its final state."""
        queue: asyncio.Queue[pb.TrainingStatus] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            status = self.history.get(job_id, self.status) if job_id else self.status
            if job_id and job_id not in self.history:
                raise NotFound(
                    f"no retrain job {shown(job_id)} on this server", reason="JOB_NOT_FOUND"
                )
            yield status
            if status.state not in _FINAL and status.state != pb.TRAINING_STATE_IDLE:
                target = status.job_id
                while True:
                    status = await queue.get()
                    if status.job_id != target:
                        continue
                    yield status
                    if status.state in _FINAL:
                        break
        finally:
            self._watchers.discard(queue)

    async def wait(self) -> None:
        """Until the running job (if any) ends."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def close(self) -> None:
        """Stop the schedule and cancel a running job (its subprocess is killed)."""
        self._closing = True
        for task in (self._schedule, self._task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
