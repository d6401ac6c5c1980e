"""A hot swap yields to serving: the parity reference child (the swap's seconds of CPU) runs at
``MODEL_LOAD_NICE``, every load without a stored reference goes through it (these hand-made
model directories have none; ``tests/server/serving/test_stored_reference.py`` covers the
rest), and each swap reports the event loop's worst lateness while it ran (a probe that sees a
held loop for what it is)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from harness import InProcessServer, feature_input
from learning_helpers import learning_settings

from training.metadata import ModelMetadata
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.serving import model_store
from xylen_server.versions.swap import LoopLag


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


def test_each_swap_reports_the_loops_worst_lateness_and_a_held_loop_shows(
    two_versions: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = InProcessServer(learning_settings(two_versions))
    predictor = server.running.predictor
    real_swap = predictor.swap
    held = {"seconds": 0.0}

    async def swap_holding_the_loop(*args: Any, **kwargs: Any) -> Any:
        time.sleep(held["seconds"])  # on the event loop: nothing else runs meanwhile
        return await real_swap(*args, **kwargs)

    monkeypatch.setattr(predictor, "swap", swap_holding_the_loop)
    lags = server.running.models.loop_lag_ms
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            stub.RollbackModel(pb.RollbackModelRequest(version=2), timeout=120)
            assert len(lags) == 1 and lags[0] >= 0.0
            held["seconds"] = 0.08
            reply = stub.RollbackModel(pb.RollbackModelRequest(version=1), timeout=120)
            assert reply.model_info.version == 1
    finally:
        server.close()
    assert len(lags) == 2
    # The probe's timer (every 5 ms) was due while the loop was held for 80 ms: it ran at
    # least 75 ms late (a lower bound that holds however slow the machine is).
    assert lags[1] >= 80.0 - LoopLag.PERIOD * 1e3 - 0.5
