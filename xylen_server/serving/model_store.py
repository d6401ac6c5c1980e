"""Loading a model directory into something that can serve, or refusing to.

A model directory from outside is checked before anything in it is parsed: only model files,
each a regular file of bounded size (:func:`training.metadata.check_model_dir`), and a
``metadata.json`` that passes the schema (:class:`training.metadata.ModelMetadata`). A model is
served only when its metadata matches the feature code, its native file loads, its
ONNX conversion (made now unless a current ``model.onnx`` sits beside it) agrees with the native
booster on the parity probe within 1e-5, and the warm-up produced finite probabilities.

Serving ONNX, the native side of that check (the probe rows and the native booster's P(up) on
them) is read from the model's ``parity.npz`` when one is bound to exactly these native and
ONNX files (:func:`stored_reference`; training writes it, and so does the child below the first
time), else made by a short-lived child process (:func:`native_reference`): this process loads
only onnxruntime, so a LightGBM server holds no xgboost, catboost, scikit-learn, scipy, pandas,
polars or onnx, and an XGBoost or CatBoost server does not keep its native library for a check
it made once. The child runs at ``MODEL_LOAD_NICE`` (:mod:`xylen_server.serving.reference`), so
a hot swap's CPU yields to Predict. Either way this process runs its own session on the probe
rows at every load and compares.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np

from training import features
from training.metadata import (
    ONNX_FILE,
    PARITY_FILE,
    PARITY_TOLERANCE,
    MetadataError,
    ModelMetadata,
    check_model_dir,
    parity_binding,
    read_parity_reference,
    read_regular_file,
    sha256_regular_file,
)
from xylen_server.errors import ModelLoadError
from xylen_server.serving.native import Engine, NativeModel
from xylen_server.serving.pacing import CpuShare
from xylen_server.serving.parity import max_difference
from xylen_server.settings import Settings
from xylen_server.signals import SignalThresholds, resolve_thresholds

logger = logging.getLogger(__name__)

T = TypeVar("T")


def at_lower_priority(
    nice: int, fn: Callable[..., T], *args: object, pacer: CpuShare | None = None
) -> T:
    """``fn(*args)`` on a short-lived thread of its own with ``nice`` added to its niceness
    (Linux keeps a niceness per thread; elsewhere, or with ``nice`` 0, on this thread as it is).

    A hot swap's own CPU in this process (building the session ~14 ms, the parity run ~17 ms,
    timing a row ~5 ms for a 500-tree model) then yields to Predict's threads on a busy machine,
    as the reference child's does; but whenever the niced thread holds the GIL (the session
    build's parse, between the parity chunks and the timed runs) the event loop waits on a
    thread the scheduler favours least, so the server's default is 0
    (``MODEL_LOAD_THREAD_NICE``): the work runs on the caller's thread, paced by its
    :class:`~xylen_server.serving.pacing.CpuShare`. A thread the niced one starts inherits its
    niceness, so ``fn`` must not start threads that serve afterwards (a session of more than one
    intra-op thread does; :func:`load_model` builds those at the caller's priority). The
    thread's CPU is charged to ``pacer`` (the caller's is already: it waits meanwhile)."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return fn(*args)
    box: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        with contextlib.suppress(OSError):  # a niceness already at 19 stays there
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        if pacer is not None:
            pacer.enter()
        try:
            box.append(fn(*args))
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
        finally:
            if pacer is not None:
                pacer.charge()

    worker = threading.Thread(target=run, name="model-load-niced", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return box[0]


@dataclass(frozen=True)
class LoadedModel:
    """A verified, warmed model and the engine that serves it."""

    meta: ModelMetadata
    engine: Engine
    parity_max_difference: float | None
    """Worst |ONNX - native| on the probe; None when serving native."""
    reference_source: str
    """Where the native side of the parity check came from: ``stored`` (the model's
    ``parity.npz``), ``child`` (a reference child made it) or ``none`` (serving native)."""
    row_cost_us: float
    """Median time of a one-row inference, measured at warm-up."""
    loop_max_rows: int
    """Largest batch of feature vectors run on the event loop (see Settings.loop_budget_us)."""
    thresholds: SignalThresholds
    """BUY / SELL thresholds served with this model (its own, overridden by the settings)."""
    feature_set: features.FeatureSet
    """The features the model takes (its ``feature_names`` over its ``lookback``)."""

    def close(self) -> None:
        self.engine.close()


def check_features(meta: ModelMetadata) -> features.FeatureSet:
    """The model's features (a subset and order of the defined ones over its lookback), or a
    refusal of a model trained with feature definitions other than the ones this code computes."""
    try:
        selection = features.FeatureSet.of(meta.feature_names, meta.lookback)
    except features.FeatureError as exc:
        raise ModelLoadError(
            f"model {meta.name}: {str(exc)[:300]} (from its metadata); retrain the model"
        ) from None
    expected = selection.definitions_hash()
    if meta.features_hash != expected:
        raise ModelLoadError(
            f"model {meta.name} was trained with feature definitions {meta.features_hash[:12]}, "
            f"this server has {expected[:12]}; retrain the model"
        )
    return selection


def served_thresholds(meta: ModelMetadata, settings: Settings) -> SignalThresholds:
    """The model's own thresholds with ``BUY_THRESHOLD`` / ``SELL_THRESHOLD`` over them."""
    try:
        return resolve_thresholds(
            meta.signal_thresholds, settings.buy_threshold, settings.sell_threshold
        )
    except ValueError as exc:
        raise ModelLoadError(f"model {meta.name!r}: {exc}") from None


def verify_checksums(
    meta: ModelMetadata, model_dir: Path, max_bytes: int, digests: dict[str, str] | None = None
) -> None:
    """Every file the metadata lists a sha256 for must still have it (``digests``: see
    :meth:`training.metadata.ModelMetadata.checksum_problem`)."""
    problem = meta.checksum_problem(model_dir, max_bytes, digests)
    if problem is not None:
        raise ModelLoadError(f"model {meta.name!r}: {problem}")


class Reference(NamedTuple):
    """What the parity reference child made."""

    model_bytes: bytes
    """The ONNX model to serve."""
    rows: np.ndarray
    """The parity probe rows."""
    probabilities: np.ndarray
    """The native booster's P(up) on them."""
    niceness: int
    """The niceness the child ran at."""


def read_onnx(model_dir: Path, max_bytes: int) -> tuple[bytes, str] | str:
    """The model's ``model.onnx`` bytes and their sha256 (hashed from those very bytes), or why
    not."""
    onnx_path = model_dir / ONNX_FILE
    if not onnx_path.is_file():
        return f"no {ONNX_FILE}"
    try:
        onnx_bytes = read_regular_file(onnx_path, max_bytes)
    except MetadataError as exc:
        return str(exc)[:300]
    return onnx_bytes, hashlib.sha256(onnx_bytes).hexdigest()


def stored_reference(
    meta: ModelMetadata,
    model_dir: Path,
    n_rows: int,
    max_bytes: int,
    onnx: tuple[bytes, str] | None = None,
    digests: Mapping[str, str] | None = None,
) -> tuple[bytes, np.ndarray, np.ndarray] | str:
    """The ONNX model's bytes, the probe rows and the native P(up) on them from the model's
    ``parity.npz``, when it is bound to the native and ONNX files as they are now (their sha256,
    the library versions, ``n_rows``: :func:`training.metadata.read_parity_reference`); else why
    not. The ONNX bytes returned are the very bytes whose sha256 matched.

    A load that has read the ONNX file (``onnx``: :func:`read_onnx`) and checked the native
    file's sha256 (``digests``) passes them in, so nothing is read or hashed twice."""
    if onnx is None:
        read = read_onnx(model_dir, max_bytes)
        if isinstance(read, str):
            return read
        onnx = read
    onnx_bytes, onnx_sha256 = onnx
    native_sha256 = (digests or {}).get(meta.native_file)
    if native_sha256 is None:
        try:
            native_sha256 = sha256_regular_file(model_dir / meta.native_file, max_bytes)
        except MetadataError as exc:
            return str(exc)[:300]
    binding = parity_binding(meta, native_sha256, onnx_sha256, n_rows)
    found = read_parity_reference(model_dir, binding, max_bytes)
    if isinstance(found, str):
        return found
    return (onnx_bytes, *found)


def native_reference(
    meta: ModelMetadata, model_dir: Path, n_rows: int, timeout: float = 600.0, nice: int = 0
) -> Reference:
    """The ONNX model's bytes, the parity probe rows and the native booster's probabilities on
    them, made by a short-lived child process (:mod:`xylen_server.serving.parity`) with
    ``nice`` added to its niceness, so this process never loads the native library, onnx or the
    converters and the child's CPU yields to serving. Blocking (a second or more): call it off
    the event loop. Raises ModelLoadError with the child's one line. The child also keeps what
    it made in the model directory (``parity.npz``) for the next load of these files."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xylen-parity-") as scratch:
        out = Path(scratch) / "reference.npz"
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "xylen_server.serving.reference",
                    str(nice),
                    str(model_dir),
                    str(out),
                    str(n_rows),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ModelLoadError(
                f"model {meta.name!r}: the parity reference took over {timeout:.0f}s"
            ) from None
        if done.returncode != 0 or not out.is_file():
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"exit status {done.returncode}"
            if done.returncode < 0:
                why = f"the native library crashed (signal {-done.returncode}) reading it"
            if why.startswith(f"model {meta.name!r}"):
                raise ModelLoadError(why[:1000])
            raise ModelLoadError(
                f"model {meta.name!r}: cannot load {meta.native_file}: {why}"[:1000]
            )
        with np.load(out) as data:
            rows = np.asarray(data["rows"], dtype=np.float32)
            reference = np.asarray(data["reference"], dtype=np.float64)
            in_memory = data["onnx"].tobytes()
            niceness = int(data["niceness"])
    logger.info(
        "parity reference for %s v%d made by a child process in %.2fs",
        meta.name,
        meta.version,
        time.perf_counter() - started,
    )
    if in_memory:
        logger.warning("model directory %s is read-only; converted in memory", model_dir)
        return Reference(in_memory, rows, reference, niceness)
    return Reference((model_dir / ONNX_FILE).read_bytes(), rows, reference, niceness)


def _no_steps(name: str) -> None:
    """The default ``step`` of :func:`load_model`: nobody is told."""


PARITY_CHUNK_ROWS = 256
"""Rows of the parity probe run at a time in a paced load (~2 ms of CPU for a 500-tree
model), so its CPU share is kept between chunks rather than after 17 ms in one go."""


def _probe_run(pool: Engine, rows: np.ndarray, pacer: CpuShare | None) -> np.ndarray:
    """The engine's P(up) on the probe rows; paced between chunks when ``pacer`` is given."""
    if pacer is None:
        return pool.predict_proba(rows)
    parts = []
    for start in range(0, len(rows), PARITY_CHUNK_ROWS):
        parts.append(pool.predict_proba(rows[start : start + PARITY_CHUNK_ROWS]))
        pacer.pace()
    return np.concatenate(parts) if parts else pool.predict_proba(rows)


def _warm_up(
    engine: Engine, n_features: int, workers: int, nice: int = 0, pacer: CpuShare | None = None
) -> float:
    """Run every session once, check the output, and return the median one-row cost in us
    (timed at ``nice``: the median of 101 runs is the row's cost, not the machine's noise).
    The pool's threads are started here, at the caller's priority: they serve afterwards."""
    rows = np.zeros((64, n_features), dtype=np.float32)
    futures = [engine.executor.submit(engine.predict_proba, rows[:n]) for n in (1, 64) * workers]
    for result in [f.result() for f in futures] + [engine.predict_on_loop(rows[:1])]:
        if not (np.isfinite(result).all() and ((result >= 0) & (result <= 1)).all()):
            raise ModelLoadError("model produced probabilities outside [0, 1] during warm-up")

    def timed() -> list[float]:
        timings = []
        for _ in range(101):
            started = time.perf_counter()
            engine.predict_on_loop(rows[:1])
            timings.append(time.perf_counter() - started)
        return timings

    return float(np.median(at_lower_priority(nice, timed, pacer=pacer))) * 1e6


def _loaded(
    meta: ModelMetadata,
    engine: Engine,
    difference: float | None,
    source: str,
    settings: Settings,
    pacer: CpuShare | None = None,
) -> LoadedModel:
    row_cost_us = _warm_up(
        engine, len(meta.feature_names), settings.pool_size, settings.model_load_thread_nice, pacer
    )
    loop_max_rows = int(settings.loop_budget_us // row_cost_us) if row_cost_us > 0 else 0
    return LoadedModel(
        meta,
        engine,
        difference,
        source,
        row_cost_us,
        min(loop_max_rows, 64),
        served_thresholds(meta, settings),
        features.FeatureSet.of(meta.feature_names, meta.lookback),
    )


def load_model(
    settings: Settings,
    model_dir: Path | None = None,
    step: Callable[[str], None] = _no_steps,
    known_sha256: Mapping[str, str] | None = None,
    pacer: CpuShare | None = None,
) -> LoadedModel:
    """Load, convert, verify and warm the model the settings name. Raises ModelLoadError.
    ``step`` is told the name of each step as it starts (``check``, ``reference``, ``session``,
    ``parity``, ``warm-up``: a hot swap's :class:`~xylen_server.versions.swap.LoopLag` books the
    event loop's lateness per step).

    Each file is hashed once: the ONNX file from the bytes that are served, every other
    checksummed file by the checksum check (or by the caller moments before in the same
    operation: ``known_sha256``, a rollback's history verification), and the stored parity
    reference's binding reuses those digests. ``pacer`` (a hot swap's
    :class:`~xylen_server.serving.pacing.CpuShare`) is charged the load's CPU and paces it
    between steps and between chunks of the parity run."""
    model_dir = settings.model_dir if model_dir is None else model_dir
    started = time.perf_counter()
    if pacer is not None:
        pacer.enter()
        told = step

        def step(name: str) -> None:
            pacer.pace()
            told(name)

    step("check")
    if not model_dir.is_dir():
        raise ModelLoadError(
            f"model {settings.model_name!r} not found: {model_dir} is not a directory"
        )
    try:
        check_model_dir(model_dir, settings.model_max_file_bytes)
        meta = ModelMetadata.read(model_dir)
    except MetadataError as exc:
        raise ModelLoadError(f"model {settings.model_name!r}: {exc}") from None
    if meta.name != settings.model_name:
        logger.warning("metadata names the model %r, served as %r", meta.name, settings.model_name)
    check_features(meta)
    served_thresholds(meta, settings)  # refuse a bad override before the slow part
    native_path = model_dir / meta.native_file
    if not native_path.is_file():
        raise ModelLoadError(f"model {meta.name!r}: native model file {native_path} is missing")
    digests = dict(known_sha256 or {})
    onnx: tuple[bytes, str] | str = "serving native"
    if settings.onnx_enabled:
        onnx = read_onnx(model_dir, settings.model_max_file_bytes)
        if isinstance(onnx, str):
            digests.pop(ONNX_FILE, None)  # the checksum check reads it and says what is wrong
        else:
            digests[ONNX_FILE] = onnx[1]  # the digest of the very bytes that will be served
    verify_checksums(meta, model_dir, settings.model_max_file_bytes, digests)
    n_features = len(meta.feature_names)
    if not settings.onnx_enabled:
        try:
            native = NativeModel(meta, model_dir, settings.pool_size)
        except Exception as exc:  # every library has its own error for a corrupt file
            raise ModelLoadError(f"model {meta.name!r}: cannot load {native_path}: {exc}") from exc
        loaded = _loaded(meta, native, None, "none", settings, pacer)
        logger.info(
            "loaded %s v%d (native, %.1f us a row) in %.2fs",
            meta.name,
            meta.version,
            loaded.row_cost_us,
            time.perf_counter() - started,
        )
        return loaded

    from xylen_server.serving.session_pool import SessionPool

    step("reference")
    stored = (
        onnx
        if isinstance(onnx, str)
        else stored_reference(
            meta,
            model_dir,
            settings.parity_probe_rows,
            settings.model_max_file_bytes,
            onnx,
            digests,
        )
    )
    if isinstance(stored, str):
        logger.info(
            "%s v%d: no usable %s (%s); a child makes the parity reference",
            meta.name,
            meta.version,
            PARITY_FILE,
            stored,
        )
        model_bytes, rows, reference, _ = native_reference(
            meta, model_dir, settings.parity_probe_rows, nice=settings.model_load_nice
        )
        source = "child"
    else:
        model_bytes, rows, reference = stored
        source = "stored"
    step("session")
    # One intra-op thread: the session starts no thread, so it may be built niced.
    build_nice = settings.model_load_thread_nice if settings.session_threads == 1 else 0
    try:
        pool = at_lower_priority(
            build_nice,
            SessionPool,
            model_bytes,
            settings.pool_size,
            settings.session_threads,
            pacer=pacer,
        )
    except Exception as exc:  # onnxruntime raises its own types for a corrupt graph
        raise ModelLoadError(f"model {meta.name!r}: cannot load ONNX model: {exc}") from exc
    if rows.shape[1:] != (n_features,):
        pool.close()
        raise ModelLoadError(f"model {meta.name!r}: the parity probe has the wrong width")
    step("parity")
    difference = max_difference(
        reference,
        at_lower_priority(settings.model_load_thread_nice, _probe_run, pool, rows, pacer),
    )
    if not difference <= PARITY_TOLERANCE:
        pool.close()
        raise ModelLoadError(
            f"model {meta.name!r}: ONNX and native probabilities differ by {difference:.3g} "
            f"on the parity probe (tolerance {PARITY_TOLERANCE:g}; native side "
            f"{'from ' + PARITY_FILE if source == 'stored' else 'made by a child'}); "
            "refusing to serve"
        )
    step("warm-up")
    loaded = _loaded(meta, pool, difference, source, settings, pacer)
    if pacer is not None:
        # The warm-up's CPU (the timed runs now run on this thread) is the load's too.
        pacer.pace()
    logger.info(
        "loaded %s v%d (onnx, %d sessions x %d threads, parity %.2g against a %s reference, "
        "%.1f us a row) in %.2fs",
        meta.name,
        meta.version,
        settings.pool_size,
        settings.session_threads,
        difference,
        source,
        loaded.row_cost_us,
        time.perf_counter() - started,
    )
    return loaded
