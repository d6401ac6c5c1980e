"""What a model server exports on its metrics port: the RPC series (from the
:class:`~xylen_server.api.metrics.Recorder` the metrics interceptor writes to), the prediction
path, the served model, the learning loop, and the ``/health`` JSON.

Series (Prometheus names; OpenTelemetry names and units in :meth:`ServerTelemetry._observe`):

=========================================== ==================================================
``rpc_server_duration_seconds``             histogram per RPC, ``model`` and status code
``rpc_server_requests_total``               calls by RPC and status code
``xylen_rpc_errors_total``                  calls that failed, by RPC, code and ErrorInfo reason
``rpc_server_active_requests``              calls in flight; ``xylen_rpc_open_streams`` streams
``xylen_rpc_sheds_total``                   calls shed at admission (too many in flight)
``xylen_rpc_events_total``                  admission's events by ``event``: undecodable,
                                            shed, expired, cancelled
``xylen_predict_rows_total``                rows answered by Predict and PredictStream
``xylen_predict_executions_total``          batches by ``where`` (``loop`` or ``pool``)
``xylen_inference_time_seconds_total``      featurise + inference time summed, by ``where``
                                            (divide by executions for the mean)
``xylen_session_wait_time_seconds_total``   time pool batches waited for a worker and session
``xylen_model_info``                        1, labels ``model_name``/``model_type``/
                                            ``model_version``/``engine``
``xylen_model_version``, ``xylen_model_serving``  the version number; 1 when SERVING
``xylen_model_signal_edge``                 by ``side`` (buy, sell): 1 when the model's own
                                            signal beat holding on its validation bars, net
                                            of the fee (GetModelInfo's ``signal_validation``);
                                            absent when the model has no such figures
``xylen_training_state``                    1 for the current state (``state`` label)
``xylen_training_last_duration_seconds``    the last finished job's duration
``xylen_training_jobs_total``               finished jobs by ``result``
``xylen_training_samples``                  feedback samples stored
``xylen_feedback_acknowledged_total``       Feedback records acknowledged (committed)
``xylen_model_swaps_total``                 swaps by ``kind`` (promoted, rolled_back, reloaded)
``xylen_storage_failures_total``            failed attempts of the background writers by
                                            ``part``: ``prediction_log`` (a flush),
                                            ``feedback_commit``, ``feedback_compaction`` (a
                                            full disk; logged once when the failures begin
                                            and once when they end)
``process_memory_rss_bytes``, ``process_memory_limit_bytes``, ``process_cpu_time_seconds_total``
=========================================== ==================================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

from xylen.v1 import model_service_pb2 as pb
from xylen_server.api.messages import trained_at
from xylen_server.api.metrics import Recorder, RpcInstruments
from xylen_server.learning.feedback import FeedbackLoop
from xylen_server.learning.retrainer import Retrainer
from xylen_server.serving.predictor import Predictor, Result
from xylen_server.settings import Settings
from xylen_server.telemetry import Meters
from xylen_server.versions.swap import ModelManager

_STATES = {
    pb.TRAINING_STATE_IDLE: "idle",
    pb.TRAINING_STATE_RUNNING: "running",
    pb.TRAINING_STATE_SUCCEEDED: "succeeded",
    pb.TRAINING_STATE_FAILED: "failed",
    pb.TRAINING_STATE_REJECTED: "rejected",
}
_FINAL = (pb.TRAINING_STATE_SUCCEEDED, pb.TRAINING_STATE_FAILED, pb.TRAINING_STATE_REJECTED)


Callback = Callable[[CallbackOptions], Iterable[Observation]]


class ServerTelemetry:
    """The model server's meters, wired to its parts. ``serving`` says whether health is
    SERVING (the server's :class:`~xylen_server.health.Health` state)."""

    def __init__(
        self,
        settings: Settings,
        recorder: Recorder,
        predictor: Predictor,
        feedback: FeedbackLoop,
        models: ModelManager,
        retrainer: Retrainer,
        serving: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.meters = Meters("xylen-server", {"xylen.model_name": settings.model_name})
        self.predictor = predictor
        self.feedback = feedback
        self.models = models
        self.retrainer = retrainer
        self.serving = serving
        meter = self.meters.meter
        recorder.instruments = RpcInstruments(
            meter, recorder, settings.model_name, self.meters.registry
        )
        # Counted here in plain integers (the loop's thread only), read at scrape time.
        # Times are summed, not put in histograms: an SDK histogram record costs several
        # microseconds, and the RPC latency histogram already has the distribution.
        self._rows = {True: 0, False: 0}
        self._batches = {True: 0, False: 0}
        self._inference = {True: 0.0, False: 0.0}
        self._waited = 0.0
        self._where = {
            True: {"where": "loop", "model": settings.model_name},
            False: {"where": "pool", "model": settings.model_name},
        }
        self._observe()

    def answered(self, result: Result) -> None:
        """One answered batch (called by the predictor for every batch, on the loop)."""
        on_loop = result.on_loop
        self._rows[on_loop] += len(result.probabilities)
        self._batches[on_loop] += 1
        self._inference[on_loop] += result.seconds
        self._waited += result.waited

    # -- observed at collection time ---------------------------------------------------------

    def _observe(self) -> None:
        meter = self.meters.meter
        gauges: list[tuple[str, str, str, Callback]] = [
            ("xylen.model.info", "", "The served model (value 1).", self._info),
            ("xylen.model.version", "", "The served model's version.", self._version),
            ("xylen.model.serving", "", "1 when health is SERVING, else 0.", self._serving),
            (
                "xylen.model.signal.edge",
                "",
                "1 when the model's own signal beat holding on its validation bars, net of the "
                "fee, by side; absent when not recorded.",
                self._signal_edge,
            ),
            ("xylen.training.state", "", "1 for the learning loop's state.", self._state),
            (
                "xylen.training.last.duration",
                "s",
                "Duration of the last finished retrain job.",
                self._last_duration,
            ),
            ("xylen.training.samples", "", "Feedback samples stored.", self._samples),
        ]
        for name, unit, description, callback in gauges:
            meter.create_observable_gauge(name, [callback], unit=unit, description=description)
        counters: list[tuple[str, str, Callback]] = [
            ("xylen.predict.rows", "Rows answered by Predict and PredictStream.", self._rows_done),
            (
                "xylen.predict.executions",
                "Batches run, by where: on the event loop or on the session pool.",
                self._executions,
            ),
            ("xylen.training.jobs", "Finished retrain jobs by result.", self._jobs),
            (
                "xylen.inference.time",
                "Featurise and inference time summed over batches, by where they ran.",
                self._inference_time,
            ),
            (
                "xylen.session.wait.time",
                "Time pool batches waited for a worker thread and its session, summed.",
                self._wait_time,
            ),
            (
                "xylen.feedback.acknowledged",
                "Feedback records acknowledged (committed), duplicates included.",
                self._acknowledged,
            ),
            ("xylen.model.swaps", "Hot swaps by kind.", self._swaps),
            (
                "xylen.storage.failures",
                "Failed attempts of the background writers (a full disk) by part.",
                self._storage_failures,
            ),
        ]
        for name, description, callback in counters:
            unit = "s" if name.endswith(".time") else ""
            meter.create_observable_counter(name, [callback], unit=unit, description=description)

    def _rows_done(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, self._where[on_loop]) for on_loop, n in self._rows.items()]

    def _executions(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, self._where[on_loop]) for on_loop, n in self._batches.items()]

    def _inference_time(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s, self._where[on_loop]) for on_loop, s in self._inference.items()]

    def _wait_time(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._waited, self._where[False])]

    def _model(self) -> Any:
        return self.predictor.model if self.predictor.ready else None

    def _info(self, _options: CallbackOptions) -> Iterable[Observation]:
        model = self._model()
        if model is None:
            return []
        meta = model.meta
        return [
            Observation(
                1,
                {
                    "model_name": meta.name,
                    "model_type": meta.model_type,
                    "model_version": str(meta.version),
                    "engine": engine_name(model),
                },
            )
        ]

    def _version(self, _options: CallbackOptions) -> Iterable[Observation]:
        model = self._model()
        return [] if model is None else [Observation(model.meta.version)]

    def _signal_edge(self, _options: CallbackOptions) -> Iterable[Observation]:
        model = self._model()
        validation = None if model is None else model.thresholds.validation
        if validation is None:
            return []
        return [
            Observation(int(validation.buy_edge), {"side": "buy"}),
            Observation(int(validation.sell_edge), {"side": "sell"}),
        ]

    def _serving(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1 if self.serving() else 0)]

    def _state(self, _options: CallbackOptions) -> Iterable[Observation]:
        current = self.retrainer.status.state
        return [
            Observation(1 if number == current else 0, {"state": name})
            for number, name in _STATES.items()
        ]

    def _last_duration(self, _options: CallbackOptions) -> Iterable[Observation]:
        finished = [s for s in self.retrainer.history.values() if s.state in _FINAL]
        if not finished:
            return []
        last = max(finished, key=lambda s: s.end_time.ToNanoseconds())
        seconds = (last.end_time.ToNanoseconds() - last.start_time.ToNanoseconds()) / 1e9
        return [Observation(max(seconds, 0.0))]

    def _samples(self, _options: CallbackOptions) -> Iterable[Observation]:
        count = self.feedback.stored_count()
        return [] if count is None else [Observation(count)]

    def _jobs(self, _options: CallbackOptions) -> Iterable[Observation]:
        results = Counter(
            _STATES[s.state] for s in self.retrainer.history.values() if s.state in _FINAL
        )
        return [
            Observation(results.get(_STATES[state], 0), {"result": _STATES[state]})
            for state in _FINAL
        ]

    def _acknowledged(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.feedback.acknowledged)]

    def _swaps(self, _options: CallbackOptions) -> Iterable[Observation]:
        swaps = self.models.swaps
        return [
            Observation(swaps.get(kind, 0), {"kind": kind})
            for kind in ("promoted", "rolled_back", "reloaded")
        ]

    def _storage_failures(self, _options: CallbackOptions) -> Iterable[Observation]:
        counts = self.feedback.storage_failures.snapshot()
        return [
            Observation(counts.get(part, 0), {"part": part})
            for part in ("prediction_log", "feedback_commit", "feedback_compaction")
        ]

    # -- /health ------------------------------------------------------------------------------

    def health(self) -> tuple[Mapping[str, Any], bool]:
        """The ``/health`` JSON and whether the server is SERVING."""
        serving = self.serving()
        model = self._model()
        payload: dict[str, Any] = {
            "status": "SERVING" if serving else "NOT_SERVING",
            "model_name": self.settings.model_name,
            "model_version": None,
            "model_type": None,
            "engine": None,
            "training_samples": None,
            "trained_at": None,
            "training_state": _STATES.get(self.retrainer.status.state, "unspecified"),
            "feedback_samples": self.feedback.stored_count(),
        }
        if model is not None:
            meta = model.meta
            payload.update(
                model_name=meta.name,
                model_version=meta.version,
                model_type=meta.model_type,
                engine=engine_name(model),
                training_samples=meta.training_samples,
                trained_at=trained_at(meta.trained_at).isoformat().replace("+00:00", "Z"),
            )
        return payload, serving


def engine_name(model: Any) -> str:
    """``onnx`` for a session pool, else the native engine's name."""
    return str(getattr(model.engine, "engine", type(model.engine).__name__))
