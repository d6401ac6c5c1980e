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

import threading
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
        self._one_row = OneRow.of(self._session)

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for a float32 (n, features) array. Thread-safe, never waits for a lock."""
        one_row = self._one_row
        if one_row is not None and rows.shape == one_row.shape and rows.dtype == np.float32:
            return one_row.run(rows, self._run_options)
        probabilities = self._run(self._outputs, {INPUT_NAME: rows}, self._run_options)[0]
        return probabilities[:, 1].astype(np.float64)

    # The session is shared and thread-safe: the loop thread runs it like any other.
    predict_on_loop = predict_proba

    @property
    def takes_values(self) -> bool:
        """:meth:`predict_value` answers (the model has a fixed width and a bound run)."""
        return self._one_row is not None

    def predict_value(self, values: list[float]) -> float:
        """P(up) of one row given as a list of its feature values (as many as the model
        takes, each one :func:`~training.metadata.model_input` would pass as it is; see
        :func:`~xylen_server.serving.inputs.feature_values`), as a Python float: the same
        value as :meth:`predict_proba` of that row. Only when :attr:`takes_values`."""
        assert self._one_row is not None
        return self._one_row.run_values(values, self._run_options)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class OneRow:
    """One row's run through an ``IOBinding`` of this thread's own: the row is copied into a
    bound float32 input buffer and onnxruntime writes P(down), P(up) into a bound output buffer.
    A run by ``run`` converts a feed dict and an output-name list, wraps the row in a new
    OrtValue and builds a new numpy array of the output, every call: measured side by side at
    one call in flight, the bound run answered a lone Predict ~25 us sooner at p50 and ~16 us
    cheaper in server CPU (whose onnxruntime call in the server costs ~30 us for a 1-tree model,
    ~3 us in a hot loop: code and data the gRPC work between calls has pushed out of the caches).

    Each thread gets its own binding and buffers (a binding is not shared between threads), so
    the loop thread, a pool thread and a load's warm-up never write into each other's. The
    answers are bit for bit ``run``'s (``tests/server/serving/test_one_row_binding.py``); a row
    of another width or type is not taken here, so it meets ``run``'s own refusal."""

    __slots__ = ("_local", "_run", "_session", "shape")

    def __init__(self, session: ort.InferenceSession, features: int, run: Any) -> None:
        self._session = session
        self._run = run
        self._local = threading.local()
        self.shape = (1, features)
        """The only input shape taken here (float32)."""

    @classmethod
    def of(cls, session: ort.InferenceSession) -> OneRow | None:
        """The bound run for ``session``: its one input a float32 matrix of a fixed width and
        its probabilities float32 of two columns (every model xylen exports); None otherwise,
        or when this onnxruntime build has no ``run_with_iobinding`` binding."""
        inputs = session.get_inputs()
        outputs = {output.name: output for output in session.get_outputs()}
        probabilities = outputs.get(PROBABILITIES_OUTPUT)
        run = getattr(getattr(session, "_sess", None), "run_with_iobinding", None)
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or probabilities is None:
            return None
        shape, out = inputs[0].shape, probabilities.shape
        if (
            not callable(run)
            or inputs[0].type != "tensor(float)"
            or probabilities.type != "tensor(float)"
            or len(shape) != 2
            or not isinstance(shape[1], int)
            or len(out) != 2
            or out[1] != 2
        ):
            return None
        return cls(session, shape[1], run)

    def _bound(self) -> tuple[Any, np.ndarray, np.ndarray]:
        """This thread's binding, input buffer and output buffer (made on its first run)."""
        held: tuple[Any, np.ndarray, np.ndarray] | None = getattr(self._local, "held", None)
        if held is None:
            binding = self._session.io_binding()
            row = np.zeros(self.shape, dtype=np.float32)
            answer = np.zeros((1, 2), dtype=np.float32)
            binding.bind_cpu_input(INPUT_NAME, row)
            binding.bind_output(
                PROBABILITIES_OUTPUT, "cpu", 0, np.float32, [1, 2], answer.ctypes.data
            )
            held = self._local.held = (binding._iobinding, row, answer)
        return held

    def run(self, rows: np.ndarray, options: ort.RunOptions) -> np.ndarray:
        """P(up) of the one row of ``rows`` (float32, :attr:`shape`), as a new float64 array."""
        binding, row, answer = self._bound()
        row[0] = rows[0]
        self._run(binding, options)
        return answer[:, 1].astype(np.float64)

    def run_values(self, values: list[float], options: ort.RunOptions) -> float:
        """P(up) of the row of feature ``values`` (Python floats, :attr:`shape`'s width): numpy
        rounds each to float32 as ``np.array(rows, dtype=np.float32)`` does, and the answer's
        float32 P(up) comes back as the float64 :meth:`run` would hold."""
        binding, row, answer = self._bound()
        row[0] = values
        self._run(binding, options)
        return answer.item(1)  # type: ignore[no-any-return]


def _binding_run(session: ort.InferenceSession) -> Any:
    """``session.run`` without its Python wrapper: onnxruntime's compiled session's own ``run``
    (same arguments, same results and errors). The wrapper checks on every call what never
    changes here (the feed names one input the model has, a numpy array, no WebGPU graph
    capture, no provider fallback on the CPU provider): ~1.5 us of a one-row run's ~15.
    A build without the binding attribute gets the public method."""
    binding = getattr(session, "_sess", None)
    run = getattr(binding, "run", None)
    return run if callable(run) else session.run
