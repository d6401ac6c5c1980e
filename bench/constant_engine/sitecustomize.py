"""The bench's engine-free xylen server: put this directory on a server's ``PYTHONPATH`` with
``XYLEN_BENCH_CONSTANT_ENGINE=<p>`` and the ONNX session pool's event-loop inference
(``predict_on_loop``, which answers every loop-batched request, and ``predict_value``, a lone
row's) returns P(up) = ``p`` for every row without calling onnxruntime. Everything else a
Predict does runs as in production: decoding, validation, the feature row and its float32 checks, calibration,
signals, ids, the prediction log, metrics, the response. The load's parity check runs on the
pool's threads (``predict_proba``, untouched), so the model loads and is checked as usual.

``python -m bench server`` measures it beside the real server at one call in flight: the p50
over the echo's that no engine call at all would leave. Nothing happens without the variable."""

from __future__ import annotations

import os

_ANSWER = os.environ.get("XYLEN_BENCH_CONSTANT_ENGINE")

if _ANSWER:
    import numpy as np

    from xylen_server.serving import session_pool

    _p = float(_ANSWER)

    def _constant(self: object, rows: np.ndarray) -> np.ndarray:
        return np.full(len(rows), _p)

    def _constant_value(self: object, values: list[float]) -> float:
        return _p

    session_pool.SessionPool.predict_on_loop = _constant  # type: ignore[method-assign]
    session_pool.SessionPool.predict_value = _constant_value  # type: ignore[method-assign]
