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
        if min(self.shutdown_grace_seconds, self.inference_delay_ms, self.loop_budget_us) < 0:
            raise SettingsError(
                "SHUTDOWN_GRACE_SECONDS, INFERENCE_DELAY_MS and LOOP_INFERENCE_BUDGET_US "
                "must not be negative"
            )

    @property
    def model_dir(self) -> Path:
        return self.model_path / self.model_name

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
}
