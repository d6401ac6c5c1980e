"""Hot swap under load: thousands of Predict calls from concurrent clients while ten swaps
happen; none fails and every answer carries a version that was live while it was in flight."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from errorinfo import error_info
from harness import InProcessServer, feature_input, write_model
from learning_helpers import add_version, learning_settings

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc


@pytest.fixture
def versions_root(tmp_path: Path, candles) -> Path:
    models = tmp_path / "models"
    write_model(models, "model_1", "lightgbm", candles, trees=30)
    add_version(models, 2, seed=2)
    add_version(models, 3, seed=3)
    return tmp_path


def test_ten_swaps_under_load_drop_nothing_and_answer_with_a_live_version(
    versions_root: Path, feature_rows
):
    server = InProcessServer(learning_settings(versions_root))
    single = pb.PredictRequest(inputs=[feature_input(feature_rows[0])])
    batch = pb.PredictRequest(inputs=[feature_input(r) for r in feature_rows[:96]])
    answers: list[tuple[float, float, set[int]]] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(request: pb.PredictRequest) -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = stub.Predict(request, timeout=30)
                except grpc.RpcError as exc:
                    failures.append(exc)
                    continue
                versions = {p.model_version for p in response.predictions}
                with lock:
                    answers.append((started, time.monotonic(), versions))

    clients = [
        threading.Thread(target=client, args=(request,))
        for request in (single, single, batch, batch)
    ]
    swaps: list[tuple[float, float, int]] = [(float("-inf"), float("-inf"), 1)]
    try:
        for thread in clients:
            thread.start()
        with grpc.insecure_channel(server.address) as channel:
            admin = pb_grpc.ModelServiceStub(channel)
            for target in [2, 3, 1, 2, 3, 1, 3, 2, 1, 3]:
                time.sleep(0.3)
                sent = time.monotonic()
                response = admin.RollbackModel(pb.RollbackModelRequest(version=target))
                swaps.append((sent, time.monotonic(), target))
                assert response.model_info.version == target
                # Reported at once, by GetModelInfo and by the next Predict.
                info = admin.GetModelInfo(pb.GetModelInfoRequest()).model_info
                assert info.version == target
                assert admin.Predict(single).predictions[0].model_version == target
            time.sleep(0.15)
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
        server.close()

    assert not failures, f"{len(failures)} failed requests, first: {failures[0]}"
    assert len(answers) >= 2000, len(answers)
    assert len(swaps) == 11
    # Version v was live from (at the earliest) the moment its swap was asked for until (at the
    # latest) the moment the next swap returned.
    windows = [
        (swaps[i][0], swaps[i + 1][1] if i + 1 < len(swaps) else float("inf"), swaps[i][2])
        for i in range(len(swaps))
    ]
    for started, ended, versions in answers:
        assert len(versions) == 1, "one response mixed versions"
        [version] = versions
        assert any(v == version and lo <= ended and started <= hi for lo, hi, v in windows), (
            f"v{version} answered a request in flight from {started} to {ended}"
        )
    seen = {next(iter(v)) for _, _, v in answers}
    assert seen == {1, 2, 3}


def test_versions_are_kept_listed_and_rollback_refuses_unknown_ones(versions_root: Path):
    server = InProcessServer(learning_settings(versions_root, model_history_keep=2))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            listed = stub.ListModelVersions(pb.ListModelVersionsRequest()).versions
            # Keep 2: the two newest, plus the serving v1, which is never pruned.
            assert [v.version for v in listed][:2] == [3, 2]
            assert any(v.version == 1 and v.serving for v in listed)
            with pytest.raises(grpc.RpcError) as caught:
                stub.RollbackModel(pb.RollbackModelRequest(version=9))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert error_info(caught.value).reason == "VERSION_NOT_FOUND"
            with pytest.raises(grpc.RpcError) as caught:
                stub.RollbackModel(pb.RollbackModelRequest(version=1))
            assert error_info(caught.value).reason == "VERSION_ALREADY_SERVING"
            moved = stub.RollbackModel(pb.RollbackModelRequest(version=3))
            assert (moved.previous_version, moved.model_info.version) == (1, 3)
            # v1 no longer serves: pruned to the 2 newest.
            listed = stub.ListModelVersions(pb.ListModelVersionsRequest()).versions
            assert [(v.version, v.serving) for v in listed] == [(3, True), (2, False)]
    finally:
        server.close()
    # The serving directory on disk holds v3: a restart serves what was served.
    from training.metadata import ModelMetadata

    assert ModelMetadata.read(versions_root / "models" / "model_1").version == 3
