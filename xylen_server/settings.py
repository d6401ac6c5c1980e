"""Server configuration: one frozen object, read once from the environment at start-up.

Every field documents its environment variable. The seed's names (``MODEL_NAME``, ``MODEL_PATH``,
``ONNX_ENABLED``, ``LOG_LEVEL``) stay as they are; a bad value stops the server at start with a
:class:`SettingsError` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """An environment variable holds a value the server cannot use."""


@dataclass(frozen=True)
class Settings:
    """How one model server runs. Defaults suit a 2-core machine (see README, Benchmarks)."""

    model_name: str = "model_1"
    """``MODEL_NAME``: directory name of the model under ``model_path``."""
    model_path: Path = Path("models")
    """``MODEL_PATH``: directory holding one sub-directory per model."""
    onnx_enabled: bool = True
    """``ONNX_ENABLED``: serve from ONNX Runtime sessions (true) or the native booster (false)."""
    log_level: str = "INFO"
    """``LOG_LEVEL``: DEBUG, INFO, WARNING, ERROR or CRITICAL."""
    host: str = "[::]"
    """``GRPC_HOST``: address the gRPC server binds (``[::]`` is every interface)."""
    grpc_port: int = 8001
    """``GRPC_PORT``: gRPC port; 0 picks a free port (printed at start)."""
    metrics_port: int = 9001
    """``METRICS_PORT``: HTTP port reserved for Prometheus metrics (the operations work)."""
    pool_size: int = 2
    """``SESSION_POOL_SIZE``: inference sessions (and worker threads) in the pool."""
    session_threads: int = 1
    """``SESSION_THREADS``: intra-op threads per ONNX Runtime session."""
    max_batch_rows: int = 4096
    """``MAX_BATCH_ROWS``: most rows one Predict may carry (RESOURCE_EXHAUSTED above)."""
    max_message_bytes: int = 16 * 1024 * 1024
    """``MAX_MESSAGE_BYTES``: largest gRPC message received or sent."""
    max_stream_in_flight: int = 64
    """``MAX_STREAM_IN_FLIGHT``: items of one PredictStream processed at once."""
    buy_threshold: float = 0.55
    """``BUY_THRESHOLD``: P(up) at or above which the signal is BUY."""
    sell_threshold: float = 0.45
    """``SELL_THRESHOLD``: P(up) at or below which the signal is SELL."""
    shutdown_grace_seconds: float = 10.0
    """``SHUTDOWN_GRACE_SECONDS``: time in-flight calls get to finish after SIGTERM."""
    parity_probe_rows: int = 2048
    """``PARITY_PROBE_ROWS``: rows of the ONNX-vs-native check run before serving."""
    loop_budget_us: float = 50.0
    """``LOOP_INFERENCE_BUDGET_US``: a batch of feature vectors whose measured cost fits this
    budget runs on the event loop (a thread hop costs ~80 us, more than a small model's row);
    anything bigger, and every candle window, runs on the pool's threads. 0 always offloads."""
    inference_delay_ms: float = 0.0
    """``INFERENCE_DELAY_MS``: test-only artificial delay added to every inference."""

    # -- continuous learning: feedback storage ----------------------------------------------
    feedback_data_dir: Path | None = None
    """``FEEDBACK_DATA_DIR``: root of the learning data; this server's lives in
    ``<dir>/<MODEL_NAME>/`` (``training_samples/``, ``feedback_wal/``, ``prediction_log/``,
    ``jobs/``), so several servers may share one root. Unset means ``model_server/data`` beside
    ``MODEL_PATH`` (``models`` -> ``model_server/data``, the seed's place)."""
    feedback_group_commit: bool = True
    """``FEEDBACK_GROUP_COMMIT``: share one fsync between concurrent Feedback calls."""
    feedback_compact_rows: int = 10_000
    """``FEEDBACK_COMPACT_ROWS``: compact the write-ahead log into Parquet after this many
    records (0: only at shutdown)."""
    feedback_max_clock_skew_seconds: float = 5.0
    """``FEEDBACK_MAX_CLOCK_SKEW_SECONDS``: how far in the future an outcome's close_time may
    be before Feedback refuses it (OUTCOME_IN_FUTURE)."""
    prediction_log_dir: Path | None = None
    """``PREDICTION_LOG_DIR``: Parquet history of every prediction (for the Feedback join and
    ``replay``); unset means ``<FEEDBACK_DATA_DIR>/<MODEL_NAME>/prediction_log``."""
    prediction_log_max_rows: int = 200_000
    """``PREDICTION_LOG_MAX_ROWS``: predictions kept in memory for the Feedback join."""
    prediction_log_max_age_seconds: float = 24 * 3600.0
    """``PREDICTION_LOG_MAX_AGE_SECONDS``: older predictions are forgotten in memory (Feedback
    must then carry the features)."""
    prediction_log_flush_rows: int = 50_000
    """``PREDICTION_LOG_FLUSH_ROWS``: write a Parquet part once this many rows are buffered."""
    prediction_log_flush_interval_seconds: float = 5.0
    """``PREDICTION_LOG_FLUSH_INTERVAL_SECONDS``: ... and at least this often."""

    # -- continuous learning: versions and retraining ----------------------------------------
    model_history_keep: int = 5
    """``MODEL_HISTORY_KEEP``: model versions kept under ``<MODEL_PATH>/.versions/<name>/``
    (the serving one is never pruned)."""
    retrain_mode: str = "incremental"
    """``RETRAIN_MODE``: default mode of a Retrain call that leaves it unset and of automatic
    retrains: ``incremental`` (LightGBM continued training; other types train in full) or
    ``full`` (history plus all feedback)."""
    retrain_min_samples: int = 100
    """``RETRAIN_MIN_SAMPLES``: fewest new samples a retrain accepts (never below 100)."""
    retrain_holdout_fraction: float = 0.2
    """``RETRAIN_HOLDOUT_FRACTION``: most recent share of the samples held out for the gate."""
    retrain_gate_margin: float = 0.002
    """``RETRAIN_GATE_MARGIN``: the candidate's held-out log loss may exceed the serving
    model's by at most this much to be promoted."""
    retrain_gate_min_auc: float = 0.52
    """``RETRAIN_GATE_MIN_AUC``: the candidate must also reach this held-out AUC (a model that
    learned nothing is never promoted, however calibrated)."""
    retrain_gate_z: float = 1.645
    """``RETRAIN_GATE_Z``: the candidate's held-out AUC must also exceed chance by this many
    standard errors (1.645: one-sided 5%), so a lucky model on a small window is refused."""
    retrain_nice: int = 10
    """``RETRAIN_NICE``: niceness added to the training subprocess (0..19)."""
    retrain_threads: int = 1
    """``RETRAIN_THREADS``: threads the training subprocess uses (leave cores to Predict)."""
    retrain_timeout_seconds: float = 3600.0
    """``RETRAIN_TIMEOUT_SECONDS``: a training subprocess running longer is killed (FAILED)."""
    retrain_auto: bool = True
    """``RETRAIN_AUTO``: start retrains automatically on the triggers below."""
    retrain_trigger_new_samples: int = 1000
    """``RETRAIN_TRIGGER_NEW_SAMPLES``: retrain once this many new samples arrived (>= 100;
    0 disables this trigger)."""
    retrain_trigger_accuracy: float = 0.0
    """``RETRAIN_TRIGGER_ACCURACY``: retrain when the live accuracy over the last
    ``RETRAIN_ACCURACY_WINDOW`` outcomes falls below this (0 disables)."""
    retrain_accuracy_window: int = 200
    """``RETRAIN_ACCURACY_WINDOW``: outcomes the rolling live accuracy is computed over."""
    retrain_schedule_seconds: float = 0.0
    """``RETRAIN_SCHEDULE_SECONDS``: also retrain this often (0 disables the schedule)."""

    def __post_init__(self) -> None:
        if not self.model_name or "/" in self.model_name or self.model_name in (".", ".."):
            raise SettingsError(
                f"MODEL_NAME must be a plain directory name, got {self.model_name!r}"
            )
        if self.log_level not in _LOG_LEVELS:
            raise SettingsError(
                f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}"
            )
        for name, value in (("GRPC_PORT", self.grpc_port), ("METRICS_PORT", self.metrics_port)):
            if not 0 <= value <= 65535:
                raise SettingsError(f"{name} must be a port number in 0..65535, got {value}")
        for name, value in (
            ("SESSION_POOL_SIZE", self.pool_size),
            ("SESSION_THREADS", self.session_threads),
            ("MAX_BATCH_ROWS", self.max_batch_rows),
            ("MAX_STREAM_IN_FLIGHT", self.max_stream_in_flight),
            ("PARITY_PROBE_ROWS", self.parity_probe_rows),
        ):
            if value < 1:
                raise SettingsError(f"{name} must be at least 1, got {value}")
        if self.max_message_bytes < 1024:
            raise SettingsError(
                f"MAX_MESSAGE_BYTES must be at least 1024, got {self.max_message_bytes}"
            )
        if not 0.0 <= self.sell_threshold < self.buy_threshold <= 1.0:
            raise SettingsError(
                "need 0 <= SELL_THRESHOLD < BUY_THRESHOLD <= 1, got "
                f"SELL_THRESHOLD={self.sell_threshold} BUY_THRESHOLD={self.buy_threshold}"
            )
        for name, value in (
            ("PREDICTION_LOG_MAX_ROWS", self.prediction_log_max_rows),
            ("PREDICTION_LOG_FLUSH_ROWS", self.prediction_log_flush_rows),
            ("MODEL_HISTORY_KEEP", self.model_history_keep),
            ("RETRAIN_THREADS", self.retrain_threads),
            ("RETRAIN_ACCURACY_WINDOW", self.retrain_accuracy_window),
        ):
            if value < 1:
                raise SettingsError(f"{name} must be at least 1, got {value}")
        if self.retrain_mode not in ("incremental", "full"):
            raise SettingsError(
                f"RETRAIN_MODE must be incremental or full, got {self.retrain_mode!r}"
            )
        if self.retrain_min_samples < 100:
            raise SettingsError(
                f"RETRAIN_MIN_SAMPLES must be at least 100, got {self.retrain_min_samples}"
            )
        if self.retrain_trigger_new_samples and self.retrain_trigger_new_samples < 100:
            raise SettingsError(
                "RETRAIN_TRIGGER_NEW_SAMPLES must be 0 (off) or at least 100, got "
                f"{self.retrain_trigger_new_samples}"
            )
        if not 0.0 < self.retrain_holdout_fraction < 0.9:
            raise SettingsError(
                "RETRAIN_HOLDOUT_FRACTION must lie in (0, 0.9), got "
                f"{self.retrain_holdout_fraction}"
            )
        if not 0.0 <= self.retrain_trigger_accuracy <= 1.0:
            raise SettingsError(
                f"RETRAIN_TRIGGER_ACCURACY must lie in [0, 1], got {self.retrain_trigger_accuracy}"
            )
        if not 0 <= self.retrain_nice <= 19:
            raise SettingsError(f"RETRAIN_NICE must lie in 0..19, got {self.retrain_nice}")
        if (
            min(
                self.feedback_compact_rows,
                self.feedback_max_clock_skew_seconds,
                self.retrain_gate_margin,
                self.retrain_gate_z,
                self.retrain_schedule_seconds,
            )
            < 0
            or self.prediction_log_max_age_seconds <= 0
            or self.prediction_log_flush_interval_seconds <= 0
            or self.retrain_timeout_seconds <= 0
        ):
            raise SettingsError(
                "FEEDBACK_COMPACT_ROWS, FEEDBACK_MAX_CLOCK_SKEW_SECONDS, RETRAIN_GATE_MARGIN, "
                "RETRAIN_GATE_Z and "
                "RETRAIN_SCHEDULE_SECONDS must not be negative; PREDICTION_LOG_MAX_AGE_SECONDS, "
                "PREDICTION_LOG_FLUSH_INTERVAL_SECONDS and RETRAIN_TIMEOUT_SECONDS must be positive"
            )
        if min(self.shutdown_grace_seconds, self.inference_delay_ms, self.loop_budget_us) < 0:
            raise SettingsError(
                "SHUTDOWN_GRACE_SECONDS, INFERENCE_DELAY_MS and LOOP_INFERENCE_BUDGET_US "
                "must not be negative"
            )

    @property
    def model_dir(self) -> Path:
        """The serving model's directory, ``<MODEL_PATH>/<MODEL_NAME>``."""
        return self.model_path / self.model_name

    @property
    def history_dir(self) -> Path:
        """Kept versions of this model: ``<MODEL_PATH>/.versions/<MODEL_NAME>/<version>/``."""
        return self.model_path / ".versions" / self.model_name

    @property
    def learning_dir(self) -> Path:
        """This server's feedback, prediction log and retrain jobs."""
        root = self.feedback_data_dir
        if root is None:
            root = self.model_path.parent / "model_server" / "data"
        return root / self.model_name

    @property
    def prediction_log_path(self) -> Path:
        """Where the prediction log's Parquet parts go."""
        if self.prediction_log_dir is not None:
            return self.prediction_log_dir
        return self.learning_dir / "prediction_log"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every field from its environment variable, keeping the default when unset."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in fields(cls):
            var = _ENV_NAMES[field.name]
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            parse = _PARSERS.get(field.name, str)
            try:
                values[field.name] = parse(raw.strip())
            except ValueError as exc:
                raise SettingsError(f"{var}={raw!r} is not valid: {exc}") from None
        return cls(**values)


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_int(raw: str) -> int:
    return int(raw, 10)


def _parse_float(raw: str) -> float:
    value = float(raw)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


_ENV_NAMES = {
    "model_name": "MODEL_NAME",
    "model_path": "MODEL_PATH",
    "onnx_enabled": "ONNX_ENABLED",
    "log_level": "LOG_LEVEL",
    "host": "GRPC_HOST",
    "grpc_port": "GRPC_PORT",
    "metrics_port": "METRICS_PORT",
    "pool_size": "SESSION_POOL_SIZE",
    "session_threads": "SESSION_THREADS",
    "max_batch_rows": "MAX_BATCH_ROWS",
    "max_message_bytes": "MAX_MESSAGE_BYTES",
    "max_stream_in_flight": "MAX_STREAM_IN_FLIGHT",
    "buy_threshold": "BUY_THRESHOLD",
    "sell_threshold": "SELL_THRESHOLD",
    "shutdown_grace_seconds": "SHUTDOWN_GRACE_SECONDS",
    "parity_probe_rows": "PARITY_PROBE_ROWS",
    "loop_budget_us": "LOOP_INFERENCE_BUDGET_US",
    "inference_delay_ms": "INFERENCE_DELAY_MS",
    "feedback_data_dir": "FEEDBACK_DATA_DIR",
    "feedback_group_commit": "FEEDBACK_GROUP_COMMIT",
    "feedback_compact_rows": "FEEDBACK_COMPACT_ROWS",
    "feedback_max_clock_skew_seconds": "FEEDBACK_MAX_CLOCK_SKEW_SECONDS",
    "prediction_log_dir": "PREDICTION_LOG_DIR",
    "prediction_log_max_rows": "PREDICTION_LOG_MAX_ROWS",
    "prediction_log_max_age_seconds": "PREDICTION_LOG_MAX_AGE_SECONDS",
    "prediction_log_flush_rows": "PREDICTION_LOG_FLUSH_ROWS",
    "prediction_log_flush_interval_seconds": "PREDICTION_LOG_FLUSH_INTERVAL_SECONDS",
    "model_history_keep": "MODEL_HISTORY_KEEP",
    "retrain_mode": "RETRAIN_MODE",
    "retrain_min_samples": "RETRAIN_MIN_SAMPLES",
    "retrain_holdout_fraction": "RETRAIN_HOLDOUT_FRACTION",
    "retrain_gate_margin": "RETRAIN_GATE_MARGIN",
    "retrain_gate_min_auc": "RETRAIN_GATE_MIN_AUC",
    "retrain_gate_z": "RETRAIN_GATE_Z",
    "retrain_nice": "RETRAIN_NICE",
    "retrain_threads": "RETRAIN_THREADS",
    "retrain_timeout_seconds": "RETRAIN_TIMEOUT_SECONDS",
    "retrain_auto": "RETRAIN_AUTO",
    "retrain_trigger_new_samples": "RETRAIN_TRIGGER_NEW_SAMPLES",
    "retrain_trigger_accuracy": "RETRAIN_TRIGGER_ACCURACY",
    "retrain_accuracy_window": "RETRAIN_ACCURACY_WINDOW",
    "retrain_schedule_seconds": "RETRAIN_SCHEDULE_SECONDS",
}

_PARSERS: dict[str, Callable[[str], Any]] = {
    "model_path": Path,
    "onnx_enabled": _parse_bool,
    "log_level": str.upper,
    "grpc_port": _parse_int,
    "metrics_port": _parse_int,
    "pool_size": _parse_int,
    "session_threads": _parse_int,
    "max_batch_rows": _parse_int,
    "max_message_bytes": _parse_int,
    "max_stream_in_flight": _parse_int,
    "buy_threshold": _parse_float,
    "sell_threshold": _parse_float,
    "shutdown_grace_seconds": _parse_float,
    "parity_probe_rows": _parse_int,
    "loop_budget_us": _parse_float,
    "inference_delay_ms": _parse_float,
    "feedback_data_dir": Path,
    "feedback_group_commit": _parse_bool,
    "feedback_compact_rows": _parse_int,
    "feedback_max_clock_skew_seconds": _parse_float,
    "prediction_log_dir": Path,
    "prediction_log_max_rows": _parse_int,
    "prediction_log_max_age_seconds": _parse_float,
    "prediction_log_flush_rows": _parse_int,
    "prediction_log_flush_interval_seconds": _parse_float,
    "model_history_keep": _parse_int,
    "retrain_mode": str.lower,
    "retrain_min_samples": _parse_int,
    "retrain_holdout_fraction": _parse_float,
    "retrain_gate_margin": _parse_float,
    "retrain_gate_min_auc": _parse_float,
    "retrain_gate_z": _parse_float,
    "retrain_nice": _parse_int,
    "retrain_threads": _parse_int,
    "retrain_timeout_seconds": _parse_float,
    "retrain_auto": _parse_bool,
    "retrain_trigger_new_samples": _parse_int,
    "retrain_trigger_accuracy": _parse_float,
    "retrain_accuracy_window": _parse_int,
    "retrain_schedule_seconds": _parse_float,
}
