"""The Go client example, built with ``make proto-go`` against the generated Go stubs and run
against a live model server: it answers what the Python stub answers. Skipped cleanly where no
Go toolchain with grpc-go is installed (.ci/run installs Debian's)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import harness
import numpy as np
import pytest

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2

ROOT = Path(__file__).resolve().parents[2]
GO_SRC = Path("/usr/share/gocode/src")
GENERATORS = (
    "google.golang.org/protobuf/cmd/protoc-gen-go",
    "google.golang.org/grpc/cmd/protoc-gen-go-grpc",
)

pytestmark = pytest.mark.skipif(
    shutil.which("go") is None or not all((GO_SRC / g).is_dir() for g in GENERATORS),
    reason="no Go toolchain with grpc-go (apt-get install golang golang-google-grpc-dev "
    "golang-google-protobuf-dev)",
)


@pytest.mark.slow
def test_the_go_client_predicts_what_the_python_stub_predicts(
    tmp_path: Path, fleet_models: Path, feature_rows: np.ndarray
) -> None:
    go_dir = tmp_path / "go"
    env = dict(os.environ, GOCACHE=str(tmp_path / "gocache"))
    build = subprocess.run(
        ["make", "--no-print-directory", "proto-go", f"GO_DIR={go_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    stubs = go_dir / "src/github.com/xylen-dev/xylen/gen/go/xylen/v1"
    assert sorted(p.name for p in stubs.glob("*.pb.go")) == [
        "ensemble_service.pb.go",
        "ensemble_service_grpc.pb.go",
        "model_service.pb.go",
        "model_service_grpc.pb.go",
        "types.pb.go",
    ]
    client = go_dir / "bin" / "xylen-client"

    server = harness.start_server(
        fleet_models, "model_2", log_dir=tmp_path, env={"FEEDBACK_DATA_DIR": str(tmp_path / "data")}
    )
    try:
        rows = [list(map(float, feature_rows[i])) for i in (10, 20)]
        args = [",".join(repr(v) for v in row) for row in rows]
        run = subprocess.run(
            [str(client), "-addr", server.address, "--", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        lines = run.stdout.splitlines()
        assert lines[0].startswith("model model_2 v1, "), lines
        with server.channel() as channel:
            response = server.stub(channel).Predict(
                pb.PredictRequest(
                    inputs=[
                        pb.PredictInput(features=types_pb2.FeatureVector(values=row))
                        for row in rows
                    ]
                ),
                timeout=30,
            )
        signals = {v: k.removeprefix("SIGNAL_") for k, v in types_pb2.Signal.items()}
        for line, expected in zip(lines[1:], response.predictions, strict=True):
            name, version, p_up, signal, prediction_id = line.split()
            assert (name, version) == ("model_2", "v1")
            assert float(p_up.removeprefix("p_up=")) == pytest.approx(
                expected.probability_up, abs=1e-6
            )
            assert signal == signals[expected.signal]
            assert prediction_id and prediction_id != expected.prediction_id

        # a bad row is the server's INVALID_ARGUMENT, printed with its code; exit 1
        bad = subprocess.run(
            [str(client), "-addr", server.address, "1,2,3"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1
        assert "Predict: InvalidArgument" in bad.stderr, bad.stderr
    finally:
        assert server.stop() == 0
