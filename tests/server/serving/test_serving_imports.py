"""A server loads only what its model needs: serving ONNX it holds onnxruntime, never a native
booster library, onnx, the converters or the data-frame stacks they bring (the native reference
for the parity check is computed by a child process that exits)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from harness import feature_input, modules_of_child, start_server, write_model

from xylen.v1 import model_service_pb2 as pb

HEAVY = (
    "lightgbm",
    "xgboost",
    "catboost",
    "sklearn",
    "scipy",
    "pandas",
    "polars",
    "onnx",
    "onnxmltools",
    "onnxconverter_common",
)

LOAD_AND_PREDICT = """
import json, sys
from pathlib import Path
import numpy as np
import xylen_server.server  # what `python -m xylen_server` imports
from xylen_server.serving.model_store import load_model
from xylen_server.settings import Settings
loaded = load_model(Settings(model_path=Path(sys.argv[1]), model_name="model_1"))
p = loaded.engine.predict_proba(np.zeros((3, len(loaded.meta.feature_names)), np.float32))
assert p.shape == (3,) and loaded.parity_max_difference is not None
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize("model_type", ["lightgbm", "xgboost", "catboost"])
def test_loading_an_onnx_model_imports_no_native_library(tmp_path: Path, model_type: str) -> None:
    write_model(tmp_path, "model_1", model_type, trees=20)
    modules = modules_of_child(LOAD_AND_PREDICT, str(tmp_path))
    assert "onnxruntime" in modules
    assert modules.isdisjoint(HEAVY), sorted(modules & set(HEAVY))
    assert (tmp_path / "model_1" / "model.onnx").is_file()  # the child converted it


def _mapped_libraries(pid: int) -> set[str]:
    """Top-level packages under site-packages with a file mapped into the process."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if "site-packages/" in path:
            found.add(path.split("site-packages/", 1)[1].split("/", 1)[0].split(".")[0])
    return found


def _eventually(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_a_running_lightgbm_server_has_no_other_library_mapped(tmp_path: Path) -> None:
    """Also once the prediction log has written Parquet and Feedback has been stored and
    compacted: pyarrow's conversions imported pandas there (~36 MiB) until the log and the
    store built their columns from buffers (``xylen_server/learning/arrow_columns.py``)."""
    write_model(tmp_path, "model_1", "lightgbm", trees=20)
    data = tmp_path / "data"
    env = {
        "FEEDBACK_DATA_DIR": str(data),
        "PREDICTION_LOG_FLUSH_INTERVAL_SECONDS": "0.2",
        "FEEDBACK_COMPACT_ROWS": "2",
    }
    server = start_server(tmp_path, env=env)
    try:
        with server.channel() as channel:
            stub = server.stub(channel)
            ids = []
            for i in range(20):
                reply = stub.Predict(pb.PredictRequest(inputs=[feature_input(np.full(25, i))]))
                assert len(reply.predictions) == 1
                ids.append(reply.predictions[0].prediction_id)
            logged = data / "model_1" / "prediction_log"
            _eventually(lambda: any(logged.glob("part-*.parquet")), "a prediction-log part")
            outcome = pb.TradeOutcome(pnl=1.0, realized_return=0.01, side=pb.TRADE_SIDE_LONG)
            outcome.close_time.GetCurrentTime()
            for prediction_id in ids[:4]:
                stub.Feedback(pb.FeedbackRequest(prediction_id=prediction_id, outcome=outcome))
            compacted = data / "model_1" / "training_samples"
            _eventually(lambda: any(compacted.glob("part-*.parquet")), "a compacted part")
        mapped = _mapped_libraries(server.proc.pid)
    finally:
        assert server.stop() == 0
    assert "onnxruntime" in mapped and "numpy" in mapped  # the check sees native extensions
    assert "pyarrow" in mapped  # ... and the Parquet writer's
    assert mapped.isdisjoint(HEAVY), sorted(mapped & set(HEAVY))
