"""A server loads only what its model needs: serving ONNX it holds onnxruntime, never a native
booster library, onnx, the converters or the data-frame stacks they bring (the native reference
for the parity check is computed by a child process that exits)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from harness import REPO, feature_input, start_server, write_model

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
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    modules = set(json.loads(done.stdout.strip().splitlines()[-1]))
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


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_a_running_lightgbm_server_has_no_other_library_mapped(tmp_path: Path) -> None:
    write_model(tmp_path, "model_1", "lightgbm", trees=20)
    server = start_server(tmp_path, env={"FEEDBACK_DATA_DIR": str(tmp_path / "data")})
    try:
        with server.channel() as channel:
            stub = server.stub(channel)
            for _ in range(20):
                reply = stub.Predict(pb.PredictRequest(inputs=[feature_input(np.zeros(25))]))
                assert len(reply.predictions) == 1
        mapped = _mapped_libraries(server.proc.pid)
    finally:
        assert server.stop() == 0
    assert "onnxruntime" in mapped and "numpy" in mapped  # the check sees native extensions
    assert mapped.isdisjoint(HEAVY), sorted(mapped & set(HEAVY))
