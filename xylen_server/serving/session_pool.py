"""One ONNX Runtime session shared by a pool of worker threads and the event-loop thread.

``InferenceSession.run`` is thread-safe and releases the GIL, so ``size`` worker threads run up
to ``size`` inferences truly in parallel on one session while the event loop keeps serving
(measured: the same CPU time per call as one session per thread). Each run gets ``threads``
intra-op threads; keep ``size * threads`` at or below the core count (onnxruntime's default of
one thread per core oversubscribes the CPU).

One session, not one per thread: building one costs ~16 ms of CPU for a 500-tree model, of
which onnxruntime 1.32 holds the GIL ~3 ms at a stretch (parsing the model; its
``initialize_session`` releases it), so each session built during a hot swap is a short pause
of the event loop and one per swap is the least there can be (``python -m bench swaps`` measures
both, and against optimizations off or a pre-optimized ORT-format model: neither holds it
shorter). It also keeps one copy of the trees in memory instead of ``size + 1``.

The event-loop thread calls the same session directly (:meth:`predict_on_loop`): a single row
of a 500-tree model takes ~12 us, a hop to a worker thread ~80 us, so tiny batches that fit the
loop's budget (see :mod:`xylen_server.serving.predictor`) run there, batched, without waiting
for a worker.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnxruntime as ort

from training.metadata import INPUT_NAME, PROBABILITIES_OUTPUT


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; warnings would be logged per call
    return options


class SessionPool:
    """One session of an ONNX model and the ``size`` threads that run it."""

    engine = "onnx"

    def __init__(self, model_bytes: bytes, size: int, threads: int) -> None:
        self.size = size
        self._session = ort.InferenceSession(
            model_bytes, session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="onnx")
        # Reused by every run: without it onnxruntime builds default run options per call,
        # 4 of a one-row run's 10 us (measured). Nothing here ever changes them.
        self._run_options = ort.RunOptions()
        self._outputs = [PROBABILITIES_OUTPUT]
        self._run = _binding_run(self._session)

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for a float32 (n, features) array. Thread-safe, never waits for a lock."""
        probabilities = self._run(self._outputs, {INPUT_NAME: rows}, self._run_options)[0]
        return probabilities[:, 1].astype(np.float64)

    # The session is shared and thread-safe: the loop thread runs it like any other.
    predict_on_loop = predict_proba

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def _binding_run(session: ort.InferenceSession) -> Any:
    """``session.run`` without its Python wrapper: onnxruntime's compiled session's own ``run``
    (same arguments, same results and errors). The wrapper checks on every call what never
    changes here (the feed names one input the model has, a numpy array, no WebGPU graph
    capture, no provider fallback on the CPU provider): ~1.5 us of a one-row run's ~15.
    A build without the binding attribute gets the public method."""
    binding = getattr(session, "_sess", None)
    run = getattr(binding, "run", None)
    return run if callable(run) else session.run
