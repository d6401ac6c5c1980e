"""A hot swap yields to serving: the parity reference child (the swap's seconds of CPU) runs at
``MODEL_LOAD_NICE``, and every load goes through it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from harness import InProcessServer, feature_input, write_model
from learning_helpers import add_version, learning_settings

from training.metadata import ModelMetadata
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.serving import model_store


@pytest.fixture
def two_versions(tmp_path: Path, candles) -> Path:
    models = tmp_path / "models"
    write_model(models, "model_1", "lightgbm", candles, trees=30)
    add_version(models, 2, seed=2)
    return tmp_path


def _own_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def test_the_reference_child_runs_at_the_niceness_it_is_given(two_versions: Path) -> None:
    model_dir = two_versions / "models" / "model_1"
    meta = ModelMetadata.read(model_dir)
    base = _own_niceness()
    niced = model_store.native_reference(meta, model_dir, 64, nice=7)
    plain = model_store.native_reference(meta, model_dir, 64, nice=0)
    assert niced.niceness == min(19, base + 7)
    assert plain.niceness == base
    # The priority changes nothing else: the same probe and the same native answers.
    assert niced.model_bytes == plain.model_bytes
    np.testing.assert_array_equal(niced.rows, plain.rows)
    np.testing.assert_array_equal(niced.probabilities, plain.probabilities)


def test_every_load_and_swap_runs_its_reference_at_model_load_nice(
    two_versions: Path, feature_rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[model_store.Reference] = []
    real = model_store.native_reference

    def recorded(*args: Any, **kwargs: Any) -> model_store.Reference:
        reference = real(*args, **kwargs)  # the real child process
        made.append(reference)
        return reference

    monkeypatch.setattr(model_store, "native_reference", recorded)
    server = InProcessServer(learning_settings(two_versions, model_load_nice=5))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            reply = stub.RollbackModel(pb.RollbackModelRequest(version=2), timeout=120)
            assert reply.model_info.version == 2
            answer = stub.Predict(pb.PredictRequest(inputs=[feature_input(feature_rows[0])]))
            assert [p.model_version for p in answer.predictions] == [2]
    finally:
        server.close()
    assert len(made) == 2  # the start-up load and the swap's
    assert [r.niceness for r in made] == [min(19, _own_niceness() + 5)] * 2
