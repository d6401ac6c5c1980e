"""A new version is built off the event loop: while its load is held at its slowest step (the
native parity reference), the server keeps answering Predict and health from the old version,
and the swap itself is one reference change (every answer names one version, and the first
answer after the swap names the new one)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import InProcessServer, feature_input
from learning_helpers import learning_settings

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.serving import model_store


def test_the_loop_serves_the_old_version_while_the_new_one_loads(
    two_versions: Path, feature_rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real = model_store.native_reference

    def held(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)  # the real child process, then hold the load here
        entered.set()
        assert release.wait(60), "the test never released the load"
        return result

    server = InProcessServer(learning_settings(two_versions))
    monkeypatch.setattr(model_store, "native_reference", held)
    request = pb.PredictRequest(inputs=[feature_input(feature_rows[0])])
    outcome: dict[str, Any] = {}
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)

            def swap() -> None:
                try:
                    outcome["reply"] = stub.RollbackModel(
                        pb.RollbackModelRequest(version=2), timeout=120
                    )
                except grpc.RpcError as exc:  # pragma: no cover - reported below
                    outcome["error"] = exc

            swapper = threading.Thread(target=swap)
            swapper.start()
            assert entered.wait(120), "the new version's load never reached the reference"
            # Mid-load: the loop answers, from the old version, and health stays SERVING.
            for _ in range(50):
                reply = stub.Predict(request, timeout=10)
                assert [p.model_version for p in reply.predictions] == [1]
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_info
            assert info.version == 1
            release.set()
            swapper.join(120)
            assert "error" not in outcome, outcome.get("error")
            assert outcome["reply"].model_info.version == 2
            reply = stub.Predict(request, timeout=10)
            assert [p.model_version for p in reply.predictions] == [2]
    finally:
        release.set()
        server.close()


def test_a_pool_builds_one_session_whatever_its_size(two_versions: Path) -> None:
    """Building a session holds the GIL while onnxruntime parses the model (~3 ms for 500
    trees), so a swap builds one, shared by the worker threads and the loop: the fewest loop
    pauses."""
    import onnxruntime as ort

    built: list[object] = []
    original = ort.InferenceSession.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    settings = learning_settings(two_versions, pool_size=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ort.InferenceSession, "__init__", counting)
        loaded = model_store.load_model(settings)
    try:
        assert len(built) == 1
        rows = __import__("numpy").zeros((8, len(loaded.meta.feature_names)), "float32")
        futures = [
            loaded.engine.executor.submit(loaded.engine.predict_proba, rows) for _ in range(16)
        ]
        results = [f.result() for f in futures] + [loaded.engine.predict_on_loop(rows)]
        assert all((r == results[0]).all() for r in results)
    finally:
        loaded.close()
