"""Server configuration: one frozen object, read once from the environment at start-up.

Each setting is declared once, as a field of :class:`Settings`: its environment variable and
bounds in :func:`env`, its parser from its type, its meaning in the docstring below it. The
model's own names stay what operators already use (``MODEL_NAME``, ``MODEL_PATH``,
``ONNX_ENABLED``, ``LOG_LEVEL``). A bad value stops the server at start with a
:class:`~xylen_server.errors.SettingsError` naming the variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from training.metadata import PARITY_PROBE_ROWS
from training.trainers import MIN_TRAINING_SAMPLES
from xylen_server.errors import SettingsError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
RETRAIN_MODES = ("incremental", "full")


def env(
    name: str,
    default: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
) -> Any:
    """A settings field read from the environment variable ``name``: ``minimum`` and
    ``maximum`` are inclusive bounds, ``above`` an exclusive lower one, ``choices`` the allowed
    words; a ``secret`` is left out of the settings' repr (and so out of any log)."""
    bounds = {"minimum": minimum, "maximum": maximum, "above": above, "choices": choices}
    return field(default=default, repr=not secret, metadata={"env": name, **bounds})


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
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


#: Parser per annotated type (annotations are strings: ``from __future__ import annotations``).
_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": _parse_int,
    "float": _parse_float,
    "bool": _parse_bool,
    "Path": Path,
    "Path | None": Path,
    "float | None": _parse_float,
}


@dataclass(frozen=True)
class Settings:
    """How one model server runs. Defaults suit a 2-core machine (see README, Benchmarks)."""

    model_name: str = env("MODEL_NAME", "model_1")
    """Directory name of the model under ``model_path``."""
    model_path: Path = env("MODEL_PATH", Path("models"))
    """Directory holding one sub-directory per model."""
    onnx_enabled: bool = env("ONNX_ENABLED", True)
    """Serve from ONNX Runtime sessions (true) or the native booster (false)."""
    log_level: str = env("LOG_LEVEL", "INFO", choices=LOG_LEVELS)
    """DEBUG, INFO, WARNING, ERROR or CRITICAL (case-insensitive)."""
    host: str = env("GRPC_HOST", "127.0.0.1")
    """Address the gRPC server binds: loopback unless told otherwise (``[::]`` or ``0.0.0.0``
    is every interface, which needs admin credentials or ``ALLOW_INSECURE_ADMIN``)."""
    grpc_port: int = env("GRPC_PORT", 8001, minimum=0, maximum=65535)
    """gRPC port; 0 picks a free port (printed at start)."""
    metrics_port: int = env("METRICS_PORT", 9001, minimum=0, maximum=65535)
    """HTTP port of ``/metrics`` (Prometheus text) and ``/health`` (JSON), on ``GRPC_HOST``;
    0 picks a free port (printed at start). The one setting of the mapping: server N of the
    fleet serves gRPC on 800N and metrics on 900N (README, Metrics)."""
    metrics_enabled: bool = env("METRICS_ENABLED", True)
    """Record metrics and serve the metrics port; false turns both off (benchmarks compare)."""
    trace_hooks: bool = env("TRACE_HOOKS", True)
    """Build the server with its trace hooks (the one flag read per Predict that opens spans
    when ``OTEL_*`` turns tracing on); false builds Predict without any, and ignores tracing:
    ``make bench`` measures tracing off against it."""
    pool_size: int = env("SESSION_POOL_SIZE", 2, minimum=1)
    """Worker threads of the session pool (they share one ONNX Runtime session per model:
    :mod:`xylen_server.serving.session_pool`)."""
    session_threads: int = env("SESSION_THREADS", 1, minimum=1)
    """Intra-op threads per ONNX Runtime session; keep ``pool_size * session_threads`` at most
    the core count."""
    max_batch_rows: int = env("MAX_BATCH_ROWS", 4096, minimum=1)
    """Most rows one Predict may carry (RESOURCE_EXHAUSTED above)."""
    max_message_bytes: int = env("MAX_MESSAGE_BYTES", 16 * 1024 * 1024, minimum=1024)
    """Largest gRPC message received or sent."""
    max_stream_in_flight: int = env("MAX_STREAM_IN_FLIGHT", 64, minimum=1)
    """Items of one PredictStream processed at once."""
    buy_threshold: float | None = env("BUY_THRESHOLD", None, minimum=0.0, maximum=1.0)
    """P(up) at or above which the signal is BUY. Unset: the model's own threshold (chosen on
    its validation data, in its metadata), or 0.55 for a model without one
    (:func:`xylen_server.signals.resolve_thresholds`)."""
    sell_threshold: float | None = env("SELL_THRESHOLD", None, minimum=0.0, maximum=1.0)
    """P(up) at or below which the signal is SELL (below the BUY threshold). Unset: the
    model's own, or 0.45."""
    shutdown_grace_seconds: float = env("SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0.0)
    """Time in-flight calls get to finish after SIGTERM."""
    parity_probe_rows: int = env("PARITY_PROBE_ROWS", PARITY_PROBE_ROWS, minimum=1)
    """Rows of the ONNX-vs-native check run before serving. A model's stored parity reference
    (``parity.npz``, training writes it with the default) is used only when it has this many;
    with another count the first load makes and keeps one of this size."""
    loop_budget_us: float = env("LOOP_INFERENCE_BUDGET_US", 50.0, minimum=0.0)
    """A batch of feature vectors whose measured cost fits this budget runs on the event loop
    (a thread hop costs ~80 us, more than a small model's row), batched with the others that
    arrive while the loop is busy (up to 64 rows an inference); anything bigger, and every
    candle window, runs on the pool's threads. 0 always offloads."""
    inference_delay_ms: float = env("INFERENCE_DELAY_MS", 0.0, minimum=0.0)
    """Test-only: an artificial delay added to every inference."""
    model_load_nice: int = env("MODEL_LOAD_NICE", 10, minimum=0, maximum=19)
    """Niceness added to the short-lived child that loads a model's native booster for the
    parity reference (and converts it to ONNX when needed): its half-second or more of CPU per
    load or hot swap yields to Predict instead of competing with it for the cores. The load's
    work in the server itself runs at ``MODEL_LOAD_THREAD_NICE``."""
    model_load_cpu_share: float = env("MODEL_LOAD_CPU_SHARE", 0.05, above=0.0, maximum=1.0)
    """Fraction of one core a hot swap's load may use in this process: the threads that build,
    check and warm the new version charge their CPU time and sleep between steps (and between
    chunks of the parity run) until it is within this share of the time since the swap began
    (:mod:`xylen_server.serving.pacing`). A swap takes longer and Predict keeps the cores;
    ``1`` never sleeps. The start-up load is not paced."""
    model_load_thread_nice: int = env("MODEL_LOAD_THREAD_NICE", 0, minimum=0, maximum=19)
    """Niceness added to the short-lived threads that build a new version's session, run its
    parity check and time a row in the server itself (Linux: niceness is per thread); 0 runs
    them on the load's own thread at the server's priority. Those threads take the GIL (the
    session build holds it ~1-2 ms parsing the model), and a niced thread that holds it is
    preempted by any busier nice-0 thread on its core while the event loop waits for the GIL:
    with a nice-0 competitor on the same core the loop's longest stall per build was 10-15 ms
    at nice 10 against ~4.7 ms at 0 (``python -m bench swaps`` prints it). The load's CPU is
    kept to ``MODEL_LOAD_CPU_SHARE`` either way; the reference child keeps
    ``MODEL_LOAD_NICE`` (its own process, its own GIL)."""

    # -- limits on requests and load (what bad input and too much load get) ------------------
    max_name_bytes: int = env("MAX_NAME_BYTES", 128, minimum=1, maximum=65536)
    """Longest ``model_name`` or retrain ``job_id`` a request may carry (UTF-8 bytes;
    INVALID_ARGUMENT NAME_TOO_LONG above)."""
    max_request_id_bytes: int = env("MAX_REQUEST_ID_BYTES", 128, minimum=1, maximum=65536)
    """Longest PredictStream ``request_id`` (UTF-8 bytes; the item is answered
    REQUEST_ID_TOO_LONG, with the id left out of the answer)."""
    max_window_candles: int = env("MAX_WINDOW_CANDLES", 1000, minimum=1)
    """Most candles one CandleWindow may carry (RESOURCE_EXHAUSTED WINDOW_TOO_LONG above;
    only the last ``lookback`` are used)."""
    max_concurrent_rpcs: int = env("MAX_CONCURRENT_RPCS", 64, minimum=1)
    """Unary calls worked on at once; more wait in the queue below."""
    max_queued_rpcs: int = env("MAX_QUEUED_RPCS", 64, minimum=0)
    """Unary calls waiting for a slot; one more is refused at once with RESOURCE_EXHAUSTED
    (reason OVERLOADED). A queued call whose deadline passes is dropped unworked. grpc refuses
    any call beyond ``MAX_CONCURRENT_RPCS + MAX_QUEUED_RPCS + MAX_CONCURRENT_STREAMS`` as it
    arrives."""
    max_concurrent_streams: int = env("MAX_CONCURRENT_STREAMS", 64, minimum=1)
    """Streaming calls (PredictStream, WatchRetrain, health Watch, reflection) open at once
    (RESOURCE_EXHAUSTED TOO_MANY_STREAMS above)."""
    max_inflight_bytes: int = env("MAX_INFLIGHT_BYTES", 64 * 1024 * 1024, minimum=1024)
    """Request bytes of the unary calls admitted (running or queued) and of the PredictStream
    items held (read, not yet answered) at once; a call or item that would pass it is refused
    with RESOURCE_EXHAUSTED (BYTES_IN_FLIGHT). One alone is always admitted up to
    ``MAX_MESSAGE_BYTES``."""
    unrequested_call_timeout_seconds: int = env(
        "UNREQUESTED_CALL_TIMEOUT_SECONDS", 300, minimum=1, maximum=86_400
    )
    """Longest grpc's core holds an arrived call that the server's event loop has not taken up
    yet (the loop is stalled: a loaded machine, a long pause). Beyond it grpc cancels the call
    and the caller sees CANCELLED, a status it cannot act on, so the bound is set far beyond any
    sane deadline (a call with a deadline ends DEADLINE_EXCEEDED first). Calls are not refused
    by age: once the loop runs again every held call gets its answer, or RESOURCE_EXHAUSTED
    beyond ``MAX_CONCURRENT_RPCS + MAX_QUEUED_RPCS + MAX_CONCURRENT_STREAMS``."""
    memory_trim_interval_seconds: float = env("MEMORY_TRIM_INTERVAL_SECONDS", 30.0, minimum=0.0)
    """Every this often the C allocator is asked to give freed memory back to the system
    (``malloc_trim``, glibc), so RSS comes back down after a burst of large requests; 0: never."""
    model_max_file_bytes: int = env("MODEL_MAX_FILE_BYTES", 256 * 1024 * 1024, minimum=1024)
    """Largest file a model directory may hold (native model, ONNX); a bigger one is refused
    before it is read or hashed (metadata.json: at most 1 MiB)."""
    arrow_memory_pool: str = env(
        "ARROW_DEFAULT_MEMORY_POOL", "system", choices=("system", "mimalloc", "jemalloc")
    )
    """Allocator of Arrow's buffers (the prediction log's Parquet parts, feedback compaction).
    Arrow's own variable, with the C library's malloc (``system``) as the server's default:
    Arrow's default mimalloc kept ~50 MiB of freed flush buffers in a loaded server, where
    ``system`` hands them to malloc, which ``MEMORY_TRIM_INTERVAL_SECONDS`` gives back."""

    # -- continuous learning: feedback storage ----------------------------------------------
    feedback_data_dir: Path | None = env("FEEDBACK_DATA_DIR", None)
    """Root of the learning data; this server's lives in ``<dir>/<MODEL_NAME>/``
    (``feedback.sqlite3``, ``training_samples/``, ``prediction_log/``, ``jobs/``), so several
    servers may share one root. Unset means ``model_server/data`` beside ``MODEL_PATH``
    (``models`` -> ``model_server/data``)."""
    feedback_group_commit: bool = env("FEEDBACK_GROUP_COMMIT", True)
    """Commit concurrent Feedback calls together: one transaction and one fsync for all that
    arrived while the last commit ran."""
    feedback_compact_rows: int = env("FEEDBACK_COMPACT_ROWS", 10_000, minimum=0)
    """Move the samples from SQLite into a Parquet part once this many are waiting (0: only at
    shutdown)."""
    feedback_max_id_bytes: int = env("FEEDBACK_MAX_ID_BYTES", 128, minimum=1)
    """Longest prediction id (UTF-8 bytes) Feedback accepts (INVALID_ARGUMENT
    PREDICTION_ID_TOO_LONG above); ids are stored for good, so they are kept short."""
    feedback_max_clock_skew_seconds: float = env(
        "FEEDBACK_MAX_CLOCK_SKEW_SECONDS", 5.0, minimum=0.0
    )
    """How far in the future an outcome's close_time may be before Feedback refuses it
    (OUTCOME_IN_FUTURE)."""
    feedback_slow_commit_ms: float = env("FEEDBACK_SLOW_COMMIT_MS", 100.0, minimum=0.0)
    """A feedback commit (its transaction and fsync) slower than this is a slow disk: counted
    and logged (one warning at most every 10 s, with the count and the slowest); 0: never."""
    prediction_log_dir: Path | None = env("PREDICTION_LOG_DIR", None)
    """Parquet history of every prediction (for the Feedback join and ``replay``); unset means
    ``<FEEDBACK_DATA_DIR>/<MODEL_NAME>/prediction_log``."""
    prediction_log_max_rows: int = env("PREDICTION_LOG_MAX_ROWS", 200_000, minimum=1)
    """Predictions kept in memory for the Feedback join."""
    prediction_log_max_age_seconds: float = env(
        "PREDICTION_LOG_MAX_AGE_SECONDS", 24 * 3600.0, above=0.0
    )
    """Older predictions are forgotten in memory (Feedback must then carry the features)."""
    prediction_log_flush_rows: int = env("PREDICTION_LOG_FLUSH_ROWS", 50_000, minimum=1)
    """Write a Parquet part once this many rows are buffered."""
    prediction_log_flush_interval_seconds: float = env(
        "PREDICTION_LOG_FLUSH_INTERVAL_SECONDS", 5.0, above=0.0
    )
    """... and at least this often."""
    prediction_log_max_bytes: int = env("PREDICTION_LOG_MAX_BYTES", 64 * 1024 * 1024, minimum=1024)
    """Most memory the in-memory predictions take (183 bytes a row with 25 features, see
    :func:`xylen_server.learning.prediction_log.row_bytes`); with ``PREDICTION_LOG_MAX_ROWS``
    the fewer rows of the two bind, so a server at the cap stays within a 256 MiB container."""
    clock_file: Path | None = env("CLOCK_FILE", None)
    """Replays only: read "now" for the learning loop (prediction times, Feedback's close-time
    checks) from this file (epoch ms, written by ``backtest``) instead of the wall clock
    (:mod:`xylen_server.clock`). Unset: the wall clock."""
    prediction_log_rollup_seconds: int = env("PREDICTION_LOG_ROLLUP_SECONDS", 3600, minimum=0)
    """Seconds of the windows (aligned to the epoch: whole UTC hours by default) whose
    prediction-log parts the flusher merges into one part a minute after the window ends by
    the learning loop's clock (a part a flush interval is ~17,000 files a day, ~24 merged);
    0: never merged."""

    # -- continuous learning: versions and retraining ----------------------------------------
    model_history_keep: int = env("MODEL_HISTORY_KEEP", 5, minimum=1)
    """Model versions kept under ``<MODEL_PATH>/.versions/<name>/`` (the serving one is never
    pruned)."""
    retrain_mode: str = env("RETRAIN_MODE", "incremental", choices=RETRAIN_MODES)
    """Mode of a Retrain call that leaves it unset and of automatic retrains: ``incremental``
    (continued training of the serving model where its type supports it; otherwise full) or
    ``full`` (history plus all feedback)."""
    retrain_min_samples: int = env(
        "RETRAIN_MIN_SAMPLES", MIN_TRAINING_SAMPLES, minimum=MIN_TRAINING_SAMPLES
    )
    """Fewest new samples a retrain accepts."""
    retrain_holdout_fraction: float = env("RETRAIN_HOLDOUT_FRACTION", 0.2)
    """Most recent share of the samples held out for the gate, in (0, 0.9)."""
    retrain_gate_margin: float = env("RETRAIN_GATE_MARGIN", 0.002, minimum=0.0)
    """The candidate's held-out log loss may exceed the serving model's by at most this much
    to be promoted."""
    retrain_gate_min_auc: float = env("RETRAIN_GATE_MIN_AUC", 0.52)
    """The candidate must also reach this held-out AUC (a model that learned nothing is never
    promoted, however calibrated)."""
    retrain_gate_z: float = env("RETRAIN_GATE_Z", 1.645, minimum=0.0)
    """The candidate's held-out AUC must also exceed chance by this many standard errors
    (1.645: one-sided 5%), so a lucky model on a small window is refused."""
    retrain_nice: int = env("RETRAIN_NICE", 10, minimum=0, maximum=19)
    """Niceness added to the training subprocess."""
    retrain_threads: int = env("RETRAIN_THREADS", 1, minimum=1)
    """Threads the training subprocess uses (leave cores to Predict)."""
    retrain_timeout_seconds: float = env("RETRAIN_TIMEOUT_SECONDS", 3600.0, above=0.0)
    """A training subprocess running longer is killed (FAILED)."""
    retrain_jobs_keep: int = env("RETRAIN_JOBS_KEEP", 100, minimum=1)
    """Retrain jobs whose directories (``jobs/<job id>/``: spec, result, status, log) are kept,
    the newest; older ones are removed as a new job starts (automatic retrains would otherwise
    add one a trigger, without end)."""
    retrain_auto: bool = env("RETRAIN_AUTO", True)
    """Start retrains automatically on the triggers below."""
    retrain_trigger_new_samples: int = env("RETRAIN_TRIGGER_NEW_SAMPLES", 1000, minimum=0)
    """Retrain once this many new samples arrived (0 disables this trigger; otherwise at least
    the retrain minimum)."""
    retrain_trigger_accuracy: float = env("RETRAIN_TRIGGER_ACCURACY", 0.0, minimum=0.0, maximum=1.0)
    """Retrain when the live accuracy over the last ``RETRAIN_ACCURACY_WINDOW`` outcomes falls
    below this (0 disables)."""
    retrain_accuracy_window: int = env("RETRAIN_ACCURACY_WINDOW", 200, minimum=1)
    """Outcomes the rolling live accuracy is computed over."""
    retrain_schedule_seconds: float = env("RETRAIN_SCHEDULE_SECONDS", 0.0, minimum=0.0)
    """Also retrain this often (0 disables the schedule)."""

    # -- who gets in: TLS and credentials (xylen_server.tls, xylen_server.auth) -----------------
    tls_cert_file: Path | None = env("TLS_CERT_FILE", None)
    """PEM certificate chain of this server; with ``TLS_KEY_FILE`` every gRPC port speaks TLS."""
    tls_key_file: Path | None = env("TLS_KEY_FILE", None)
    """PEM private key of ``TLS_CERT_FILE``."""
    tls_client_ca_file: Path | None = env("TLS_CLIENT_CA_FILE", None)
    """PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)."""
    admin_token: str = env("ADMIN_TOKEN", "", secret=True)
    """Bearer token of the admin and state-changing RPCs (Feedback, Retrain, RollbackModel,
    ReloadModel; the coordinator's Feedback): ``authorization: Bearer <token>``."""
    admin_token_file: Path | None = env("ADMIN_TOKEN_FILE", None)
    """File holding the admin token (one line), instead of ``ADMIN_TOKEN``."""
    admin_identities: str = env("ADMIN_IDENTITIES", "")
    """Comma-separated mTLS client identities (certificate subject CN or a SAN) allowed the
    admin RPCs without a token."""
    predict_token: str = env("PREDICT_TOKEN", "", secret=True)
    """When set, Predict, PredictStream, GetModelInfo, WatchRetrain and ListModelVersions need
    this bearer token (or the admin credentials); unset they are open."""
    predict_token_file: Path | None = env("PREDICT_TOKEN_FILE", None)
    """File holding the predict token, instead of ``PREDICT_TOKEN``."""
    allow_insecure_admin: bool = env("ALLOW_INSECURE_ADMIN", False)
    """Start even with the admin RPCs open (no token, no mTLS) on a non-loopback address."""

    # -- every core: worker processes on one port (xylen_server.workers) --------------------
    workers: str = env("WORKERS", "1")
    """Server processes serving the one gRPC port (``SO_REUSEPORT``): a number, or ``auto``
    for the CPUs this process may use (its affinity, capped by the cgroup CPU quota, rounded
    down, at least 1: a container given ``cpus: '0.5'`` gets 1). With more than one, a
    supervisor process holds the port, starts the workers (worker 0 owns the feedback store
    and the retrain job), restarts one that dies, and serves the merged ``/metrics``."""
    worker_index: int = env("WORKER_INDEX", -1, minimum=-1, maximum=1023)
    """Set by the supervisor in each worker's environment: its index (0 is the owner of the
    learning loop); -1, the default, is a server on its own."""
    worker_run_dir: Path | None = env("WORKER_RUN_DIR", None)
    """Set by the supervisor: the private (0700) directory of the workers' unix sockets."""
    worker_cpu_affinity: str = env("WORKER_CPU_AFFINITY", "off", choices=("auto", "off"))
    """With several workers: ``auto`` pins each worker (every thread of it) to a CPU of its
    own, the i-th of the CPUs the supervisor may use, when it may use exactly as many CPUs as
    there are workers (otherwise none is pinned: more CPUs than workers is a quota on a bigger
    host, where pinning would stack replicas on its first cores); ``off`` leaves placement to
    the kernel (the default). A worker's threads hand each call on to each other (grpc's
    threads, the event loop): pinned, they do so without waking another core. Measured on a
    quiet 2-core machine (``python -m bench workers``): with the load client on the same cores
    pinned workers cost 1.17x one process's CPU per call against 1.30x unpinned, but with a
    light (C) client both cost 1.15x and unpinned served 1.21x the calls/s against 0.99x, so
    ``off`` is the default and ``auto`` is for hosts whose clients share the cores."""
    worker_cpu: int = env("WORKER_CPU", -1, minimum=-1, maximum=65535)
    """Set by the supervisor in a worker's environment: the CPU it pins itself to at start
    (``WORKER_CPU_AFFINITY``); -1, the default: not pinned."""

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_bounds(f.metadata, getattr(self, f.name))
        if not self.model_name or "/" in self.model_name or self.model_name in (".", ".."):
            raise SettingsError(
                f"MODEL_NAME must be a plain directory name, got {self.model_name!r}"
            )
        if (
            self.sell_threshold is not None
            and self.buy_threshold is not None
            and not self.sell_threshold < self.buy_threshold
        ):
            raise SettingsError(
                "need SELL_THRESHOLD < BUY_THRESHOLD, got "
                f"SELL_THRESHOLD={self.sell_threshold} BUY_THRESHOLD={self.buy_threshold}"
            )
        if 0 < self.retrain_trigger_new_samples < MIN_TRAINING_SAMPLES:
            raise SettingsError(
                f"RETRAIN_TRIGGER_NEW_SAMPLES must be 0 (off) or at least "
                f"{MIN_TRAINING_SAMPLES}, got {self.retrain_trigger_new_samples}"
            )
        workers = self.workers.strip().lower()
        if workers != "auto" and not (workers.isdigit() and 1 <= int(workers) <= 1024):
            raise SettingsError(
                f"WORKERS must be a number from 1 to 1024 or auto, got {self.workers[:40]!r}"
            )
        if not 0.0 < self.retrain_holdout_fraction < 0.9:
            raise SettingsError(
                "RETRAIN_HOLDOUT_FRACTION must lie in (0, 0.9), got "
                f"{self.retrain_holdout_fraction}"
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
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every field from its environment variable, keeping the default when unset."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = f.metadata["env"]
            raw = environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                value = _PARSERS[str(f.type)](raw.strip())
            except ValueError as exc:
                raise SettingsError(f"{var}={raw!r} is not valid: {exc}") from None
            if f.metadata["choices"] is not None:
                value = value.upper() if value.upper() in f.metadata["choices"] else value.lower()
            values[f.name] = value
        return cls(**values)


def _check_bounds(metadata: Mapping[str, Any], value: Any) -> None:
    var = metadata["env"]
    choices = metadata["choices"]
    if choices is not None and value not in choices:
        raise SettingsError(f"{var} must be one of {', '.join(choices)}, got {value!r}")
    low, high, above = metadata["minimum"], metadata["maximum"], metadata["above"]
    if value is None or (low is None and high is None and above is None):
        return
    if not math.isfinite(value):
        raise SettingsError(f"{var} must be a finite number, got {value}")
    if low is not None and value < low:
        raise SettingsError(f"{var} must be at least {low:g}, got {value}")
    if above is not None and value <= above:
        raise SettingsError(f"{var} must be greater than {above:g}, got {value}")
    if high is not None and value > high:
        raise SettingsError(f"{var} must be at most {high:g}, got {value}")
