"""The session pool and the event loop: parallel sessions, no blocking, signals, error mapping."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
from grpc_status import rpc_status

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.errors import InvalidArgument, to_item_status, to_rpc_status
from xylen_server.serving.session_pool import SessionPool


class CountingPool(SessionPool):
    """A SessionPool that records how many sessions were running at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def predict_proba(self, rows):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            return super().predict_proba(rows)
        finally:
            with self.lock:
                self.running -= 1


def test_concurrent_requests_run_on_different_sessions_at_once(server):
    model_bytes = (server.running.predictor.settings.model_dir / "model.onnx").read_bytes()
    pool = CountingPool(model_bytes, size=2, threads=1)
    try:
        rows = np.random.default_rng(0).normal(size=(60_000, 25)).astype(np.float32)
        futures = [pool.executor.submit(pool.predict_proba, rows) for _ in range(6)]
        results = [f.result() for f in futures]
        assert pool.peak == 2  # both sessions busy at the same time: no global lock
        for r in results[1:]:
            np.testing.assert_array_equal(r, results[0])
    finally:
        pool.close()


def test_the_event_loop_keeps_running_during_inference(server, feature_rows):
    """A large batch is inferred while a coroutine on the same loop keeps ticking."""
    predictor = server.running.predictor
    request = pb.PredictRequest(
        inputs=[
            pb.PredictInput(features=types_pb2.FeatureVector(values=r.tolist()))
            for r in feature_rows[:2000]
        ]
    )

    async def scenario():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        results = [await predictor.predict(request) for _ in range(3)]
        done.set()
        await task
        return ticks, results

    ticks, results = server.call(scenario())
    assert all(len(r.probabilities) == 2000 for r in results)
    assert ticks > 10


def test_errors_map_to_status_with_error_info():
    status = to_rpc_status(InvalidArgument("row 2 is bad", reason="BAD_ROW", row=2))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == "row 2 is bad"
    grpc_status = rpc_status.to_status(status)
    assert grpc_status.code == grpc.StatusCode.INVALID_ARGUMENT
    item = to_item_status(InvalidArgument("x", reason="BAD_ROW", row=2))
    assert (item.reason, dict(item.metadata)) == ("BAD_ROW", {"row": "2"})


def test_unexpected_errors_become_internal_without_details(caplog):
    status = to_rpc_status(KeyError("secret internals"))
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    assert "secret" not in status.message
    assert "unexpected error" in caplog.text


def test_tiny_batches_run_on_the_loop_and_agree_with_the_pool(server, stub, feature_rows):
    model = server.running.predictor.model
    assert 1 <= model.loop_max_rows <= 64  # a small model fits the default 50 us budget
    single = [
        stub.Predict(pb.PredictRequest(inputs=[_features(r)])).predictions[0].probability_up
        for r in feature_rows[:20]
    ]
    batch = stub.Predict(pb.PredictRequest(inputs=[_features(r) for r in feature_rows[:100]]))
    assert single == [p.probability_up for p in batch.predictions[:20]]


def test_a_zero_loop_budget_always_offloads(models_root):
    from harness import server_settings

    from xylen_server.serving.model_store import load_model

    model = load_model(server_settings(models_root, loop_budget_us=0.0))
    try:
        assert model.loop_max_rows == 0
        assert model.row_cost_us > 0
    finally:
        model.close()


def _features(row):
    return pb.PredictInput(features=types_pb2.FeatureVector(values=row.tolist()))
