"""A Predict is answered first and logged and counted in the event loop's next turn (so grpc
sends the answer before that work): nothing is lost by it. A Feedback sent the moment its
answer arrives finds the prediction with the row the model ran on, every time, for unary
calls and stream items; every call is counted once it has ended.

A real in-process server (real gRPC on loopback, real onnxruntime, a real feedback store)."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
from harness import InProcessServer, feature_input, settled
from learning_helpers import learning_settings, outcome

from training.metadata import model_input
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc

SERVICE = "/xylen.v1.ModelService/"


def test_feedback_sent_the_moment_an_answer_arrives_finds_its_prediction(
    models_root, feature_rows, tmp_path
):
    shutil.copytree(models_root, tmp_path / "models")
    server = InProcessServer(learning_settings(tmp_path))
    rows = np.asarray(feature_rows[:150], dtype=np.float64)
    try:
        recorder = server.running.recorder
        settled(recorder)
        before = recorder.calls(SERVICE + "Predict", "OK")
        predictor = server.running.predictor
        lone_before = predictor.lone_runs
        stored, answered = [], []
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            for i, row in enumerate(rows):
                request = pb.PredictRequest(inputs=[feature_input(row)])
                if i % 2:
                    item = pb.PredictStreamRequest(request_id=str(i), request=request)
                    (answer,) = stub.PredictStream(iter([item]))
                    prediction = answer.response.predictions[0]
                else:
                    prediction = stub.Predict(request).predictions[0]
                reply = stub.Feedback(
                    pb.FeedbackRequest(
                        prediction_id=prediction.prediction_id, outcome=outcome(0.01)
                    )
                )
                assert not reply.duplicate
                stored.append(reply.stored_samples)
                answered.append(prediction)
        assert stored == list(range(stored[0], stored[0] + len(rows)))  # each one stored
        assert predictor.lone_runs - lone_before >= len(rows) // 2  # answered alone, mostly
        settled(recorder)
        assert recorder.calls(SERVICE + "Predict", "OK") - before == len(rows) // 2
        # The log holds each answer with the float32 row the model ran on.
        log = server.running.feedback.log
        for row, prediction in zip(rows, answered, strict=True):
            kept = log.get(prediction.prediction_id)
            assert kept is not None
            assert kept.features.tobytes() == model_input(row[None, :])[0].tobytes()
            assert kept.probability_up == prediction.probability_up
    finally:
        server.close()
