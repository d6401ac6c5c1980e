"""A Predict call cancelled while its inference already runs on a worker thread keeps the model
held until that worker is done: a hot swap meanwhile closes the replaced model only after the
inference ended (closing it earlier frees what the worker still uses: the native LightGBM
engine's prediction configs, the ONNX pool's threads).

A real server with the test-only slowed inference (``INFERENCE_DELAY_MS``), a real call whose
deadline passes mid-inference, a real swap; the old engine's own ``predict_proba`` and ``close``
are wrapped only to record the order they happened in."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest
from harness import InProcessServer, feature_input, write_model
from learning_helpers import learning_settings

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.serving.model_store import load_model

DELAY_MS = 1500


@pytest.mark.parametrize("onnx", [True, False], ids=["onnx", "native"])
def test_a_cancelled_call_holds_its_model_through_a_swap(
    tmp_path: Path, candles, feature_rows, onnx: bool
):
    write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=10)
    settings = learning_settings(tmp_path, inference_delay_ms=DELAY_MS, onnx_enabled=onnx)
    server = InProcessServer(settings)
    try:
        old = server.model
        replacement = load_model(settings)  # loaded and warmed beside it, as a swap does
        events: list[str] = []
        real_predict, real_close = old.engine.predict_proba, old.engine.close

        def predict_proba(rows):  # runs after the delay: the worker is inside inference
            answer = real_predict(rows)
            events.append("inference ended")
            return answer

        def close() -> None:
            events.append("closed")
            real_close()

        old.engine.predict_proba = predict_proba
        old.engine.close = close
        request = pb.PredictRequest(inputs=[feature_input(row) for row in feature_rows[:4]])

        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            # The deadline passes while the worker sleeps in the slowed inference.
            cancelled = stub.Predict.future(request, timeout=DELAY_MS / 1000 / 5)
            with pytest.raises(grpc.RpcError) as expired:
                cancelled.result()
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert events == []  # the worker is still in its inference

            swap = asyncio.run_coroutine_threadsafe(
                server.running.predictor.swap(replacement), server.loop
            )
            while server.model is not replacement:
                threading.Event().wait(0.01)
            # Calls during the swap go to the new model and all answer.
            during = [stub.Predict.future(request, timeout=60) for _ in range(3)]
            assert swap.result(60) is old
            answers = [call.result() for call in during]
            assert [len(answer.predictions) for answer in answers] == [4, 4, 4]

        assert events == ["inference ended", "closed"], "closed while a worker still used it"
        with grpc.insecure_channel(server.address) as channel:
            after = pb_grpc.ModelServiceStub(channel).Predict(request, timeout=60)
        assert len(after.predictions) == 4
    finally:
        server.close()
