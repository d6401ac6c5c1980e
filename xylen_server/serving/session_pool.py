"""A pool of ONNX Runtime sessions, one per worker thread, so requests never share a lock.

``InferenceSession.run`` releases the GIL, so with ``size`` sessions and ``size`` worker threads
up to ``size`` inferences run truly in parallel while the event loop keeps serving. Each session
gets ``threads`` intra-op threads; keep ``size * threads`` at or below the core count
(onnxruntime's default of one thread per core *per session* oversubscribes the CPU).

One more session belongs to the event-loop thread alone (:meth:`predict_on_loop`): a single row
of a 500-tree model takes ~12 us, a hop to a worker thread ~80 us, so tiny batches that fit the
loop's budget (see :mod:`xylen_server.serving.predictor`) run there without waiting for a worker.
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor

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
    """``size`` sessions of one ONNX model and the ``size`` threads that run them."""

    engine = "onnx"

    def __init__(self, model_bytes: bytes, size: int, threads: int) -> None:
        options = session_options(threads)
        self.size = size
        self._idle: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for _ in range(size):
            session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
            self._idle.put(session)
        self._loop_session = ort.InferenceSession(
            model_bytes, options, providers=["CPUExecutionProvider"]
        )
        self.executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="onnx")

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for a float32 (n, features) array. Thread-safe; blocks only if every session is
        busy, which cannot happen from the pool's own ``size`` threads."""
        session = self._idle.get()
        try:
            probabilities = session.run([PROBABILITIES_OUTPUT], {INPUT_NAME: rows})[0]
        finally:
            self._idle.put(session)
        return np.asarray(probabilities[:, 1], dtype=np.float64)

    def predict_on_loop(self, rows: np.ndarray) -> np.ndarray:
        """P(up) on the event-loop thread's own session (call it from that thread only)."""
        probabilities = self._loop_session.run([PROBABILITIES_OUTPUT], {INPUT_NAME: rows})[0]
        return np.asarray(probabilities[:, 1], dtype=np.float64)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
