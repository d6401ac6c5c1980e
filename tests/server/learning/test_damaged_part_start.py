"""A damaged Parquet part of the feedback store does not keep a server from serving: counting
the samples new to a retrained model (which reads the parts) fails, is logged, and counts 0;
Predict and Feedback are answered. Before, the server did not start at all."""

from __future__ import annotations

import json
import logging
import time

import grpc
import numpy as np
import pytest
from harness import InProcessServer, feature_input, synthetic_candles, write_model
from learning_helpers import feedback, learning_settings

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.learning.feedback_store import FeedbackStore
from xylen_server.learning.samples import FeedbackRecord


def test_a_server_whose_store_has_a_damaged_part_starts_and_serves(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    candles = synthetic_candles()
    model_dir = write_model(tmp_path / "models", "model_1", "lightgbm", candles, trees=20)
    meta = json.loads((model_dir / "metadata.json").read_text())
    meta.setdefault("data", {})["feedback"] = {"received_until_ms": 1}  # a retrained model
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    width = len(meta["feature_names"])
    settings = learning_settings(tmp_path)
    now_ms = int(time.time() * 1000)
    with FeedbackStore(settings.learning_dir, compact_rows=0) as store:
        store.append(
            FeedbackRecord("x-1", "model_1", 1, np.zeros(width, np.float32), 0.6, 1, 1.0, 0.01,
                           now_ms - 5000, now_ms, 1, side=1)
        )  # fmt: skip
        part = store.compact()
    assert part is not None
    part.write_bytes(part.read_bytes()[:100])  # damaged
    with caplog.at_level(logging.ERROR, logger="xylen_server.learning.retrainer"):
        server = InProcessServer(settings)
    try:
        assert "cannot count the feedback samples new to v1" in caplog.text
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            row = np.linspace(0.1, 0.9, width)
            answer = stub.Predict(pb.PredictRequest(inputs=[feature_input(row)]))
            assert len(answer.predictions) == 1
            stored = stub.Feedback(feedback(answer.predictions[0].prediction_id, 0.01))
            assert not stored.duplicate
    finally:
        server.close()
