"""`xylen-coordinator serve` and `predict` as real processes: EnsembleService over gRPC,
SIGHUP reload under load, a bad new file keeping the old config, errors with ErrorInfo,
reflection, graceful SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import harness
import numpy as np
import pytest
import yaml
from coordinator.coordinator_process import CoordinatorProcess
from coordinator.helpers import endpoint, four_endpoints, free_port, write_config
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from training.generator import kline_csv, simulate
from xylen.v1 import ensemble_service_pb2 as epb

REPO = Path(__file__).resolve().parents[2]


def request(
    fleet_candles: dict[str, np.ndarray], end: int = 450
) -> epb.EnsembleServicePredictRequest:
    return epb.EnsembleServicePredictRequest(inputs=[harness.window_input(fleet_candles, end)])


def test_sighup_adds_a_fifth_server_under_load_without_a_failed_request(
    four_servers: list[harness.ServerProcess],
    fleet_models: Path,
    fleet_candles: dict[str, np.ndarray],
    tmp_path: Path,
    coordinator_factory: Callable[[Path], CoordinatorProcess],
) -> None:
    fifth = harness.start_server(fleet_models, "model_5")
    try:
        path = write_config(tmp_path / "config.yaml", four_endpoints(four_servers))
        coordinator = coordinator_factory(path)
        voters: list[tuple[str, ...]] = []
        failures: list[str] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    response = coordinator.stub.Predict(request(fleet_candles), timeout=10)
                    voters.append(tuple(v.server_name for v in response.predictions[0].votes))
                except grpc.RpcError as error:
                    failures.append(f"{error.code()}: {error.details()}")

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            raw = yaml.safe_load(path.read_text())
            raw["model_endpoints"].append(endpoint("model_5", fifth.port, 0.5))
            raw["model_endpoints"][0]["weight"] = 0.8  # re-weight too
            path.write_text(yaml.safe_dump(raw))
            coordinator.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (not voters or len(voters[-1]) < 5):
                time.sleep(0.05)
            time.sleep(0.3)
            # A broken file: reload refused, the five-server config stays.
            path.write_text("model_endpoints: [ {name: model_1, port: nope")
            coordinator.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert failures == []
        assert voters[0] == ("model_1", "model_2", "model_3", "model_4")
        assert voters[-1] == ("model_1", "model_2", "model_3", "model_4", "model_5")
        response = coordinator.stub.Predict(request(fleet_candles), timeout=10)
        shares = {v.server_name: v.configured_weight for v in response.predictions[0].votes}
        assert shares == pytest.approx(
            {"model_1": 0.8, "model_2": 0.3, "model_3": 0.2, "model_4": 0.1, "model_5": 0.5}
        )
        info = coordinator.stub.GetEnsembleInfo(epb.GetEnsembleInfoRequest(), timeout=5)
        assert [e.name for e in info.endpoints][-1] == "model_5" and all(
            e.serving for e in info.endpoints
        )
        assert coordinator.stop() == 0
        log = coordinator.log()
        assert "configuration NOT reloaded, keeping the old one" in log and "not valid YAML" in log
    finally:
        fifth.stop()


def test_no_quorum_over_grpc_carries_errorinfo_and_reflection_lists_the_service(
    tmp_path: Path, coordinator_factory: Callable[[Path], CoordinatorProcess]
) -> None:
    path = write_config(
        tmp_path / "config.yaml",
        [endpoint("gone_1", free_port(), 1), endpoint("gone_2", free_port(), 1)],
    )
    coordinator = coordinator_factory(path)
    row = epb.EnsembleServicePredictRequest(inputs=[harness.feature_input([0.0, 1.0])])
    with pytest.raises(grpc.RpcError) as info:
        coordinator.stub.Predict(row, timeout=10)
    error = info.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "gone_1" in error.details() and "gone_2" in error.details()  # type: ignore[attr-defined]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    detail = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(detail) and detail.reason == "NO_QUORUM"
    with pytest.raises(grpc.RpcError) as empty:
        coordinator.stub.Predict(epb.EnsembleServicePredictRequest(), timeout=10)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    listing = subprocess.run(
        [str(REPO / ".venv/bin/grpcurl"), "-plaintext", f"127.0.0.1:{coordinator.port}", "list"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "xylen.v1.EnsembleService" in listing.stdout, listing.stderr
    assert coordinator.stop() == 0


def test_feedback_over_grpc(
    four_servers: list[harness.ServerProcess],
    fleet_candles: dict[str, np.ndarray],
    tmp_path: Path,
    coordinator_factory: Callable[[Path], CoordinatorProcess],
) -> None:
    path = write_config(tmp_path / "config.yaml", four_endpoints(four_servers))
    coordinator = coordinator_factory(path)
    prediction = coordinator.stub.Predict(request(fleet_candles), timeout=10).predictions[0]
    feedback = epb.EnsembleServiceFeedbackRequest(prediction_id=prediction.prediction_id)
    feedback.outcome.realized_return = 0.01
    feedback.outcome.underlying_log_return = 0.01
    feedback.outcome.close_time.FromDatetime(datetime.now(UTC))
    ack = coordinator.stub.Feedback(feedback, timeout=10)
    assert ack.prediction_id == prediction.prediction_id and not ack.duplicate
    assert list(ack.forward_to) == ["model_1", "model_2", "model_3", "model_4"]
    assert coordinator.stub.Feedback(feedback, timeout=10).duplicate
    unknown = epb.EnsembleServiceFeedbackRequest(prediction_id="nope", outcome=feedback.outcome)
    with pytest.raises(grpc.RpcError) as info:
        coordinator.stub.Feedback(unknown, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert coordinator.stop() == 0


def test_cli_predict_prints_the_decision_and_every_vote(
    four_servers: list[harness.ServerProcess], tmp_path: Path
) -> None:
    start = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp() * 1000)
    frame = simulate(
        np.arange(start, start + 300 * 3_600_000, 3_600_000, dtype=np.int64), 3_600_000, 5
    )
    csv = tmp_path / "BTCUSDT-1h-2024-03.csv"
    csv.write_bytes(kline_csv(frame))
    path = write_config(tmp_path / "config.yaml", four_endpoints(four_servers))
    done = subprocess.run(
        [sys.executable, "-m", "xylen_coordinator", "predict", "--config", str(path),
         "--candles", str(csv), "--rows", "2"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("p_up=") == 2 and "4 of 4 servers voted" in out
    for name in ("model_1", "model_2", "model_3", "model_4"):
        assert out.count(name) >= 2
