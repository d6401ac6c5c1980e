"""A server whose event loop stalls (a loaded machine, a long pause, a blocking call) while
calls arrive. grpc's core holds those calls until the loop takes them up; they must then be
answered, or refused RESOURCE_EXHAUSTED under a flood, never CANCELLED (a status the caller
cannot act on). Until UNREQUESTED_CALL_TIMEOUT_SECONDS was a setting, grpc's core cancelled a
call held over one second, so a one-second stall turned the calls that arrived during it into
CANCELLED."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import InProcessServer, feature_input, health_status, server_settings
from learning_helpers import feedback

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc

#: Longer than the one second grpc's core used to hold a call before cancelling it.
STALL_SECONDS = 2.5


def _stall(server: InProcessServer, seconds: float) -> None:
    """Block the server's event loop for ``seconds`` with a blocking call scheduled on it;
    returns once the loop is blocked, so the calls sent next arrive during the stall."""
    blocked = threading.Event()

    def block() -> None:
        blocked.set()
        time.sleep(seconds)

    server.loop.call_soon_threadsafe(block)
    assert blocked.wait(30)


def _reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a refusal, or grpc's own message when it has none."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason
    return f"grpc: {error.details()}"


def _outcomes(futures: list[grpc.Future]) -> tuple[Counter[str], Counter[str]]:
    codes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for future in futures:
        try:
            future.result()
            codes["OK"] += 1
        except grpc.RpcError as error:
            codes[error.code().name] += 1
            reasons[_reason(error)] += 1
    return codes, reasons


def test_calls_that_arrive_while_the_loop_stalls_are_answered_not_cancelled(
    models_root: Path, tmp_path: Path, feature_rows
):
    running = InProcessServer(server_settings(models_root, feedback_data_dir=tmp_path / "data"))
    try:
        request = pb.PredictRequest(inputs=[feature_input(feature_rows[0])])
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            stub.Predict(request, timeout=30)  # connected and warm
            _stall(running, STALL_SECONDS)
            futures = [stub.Predict.future(request, timeout=120) for _ in range(20)]
            # Feedback too (64 of them in flight came back CANCELLED on a loaded machine)
            futures += [
                stub.Feedback.future(feedback(f"stall-{i}", 0.01, feature_rows[i]), timeout=120)
                for i in range(20)
            ]
            codes, _ = _outcomes(futures)
            assert codes == Counter({"OK": 40}), codes
            # every outcome acknowledged is stored
            store = running.running.feedback.require_store()
            assert len(store.read_samples()) == 20
    finally:
        running.close()


def test_a_flood_during_a_stall_is_refused_resource_exhausted_not_cancelled(
    models_root: Path, tmp_path: Path, feature_rows
):
    running = InProcessServer(
        server_settings(
            models_root,
            max_concurrent_rpcs=2,
            max_queued_rpcs=2,
            max_concurrent_streams=1,
            inference_delay_ms=40.0,
            feedback_data_dir=tmp_path / "data",
        )
    )
    try:
        request = pb.PredictRequest(inputs=[feature_input(feature_rows[0])])
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            stub.Predict(request, timeout=30)
            _stall(running, STALL_SECONDS)
            futures = [stub.Predict.future(request, timeout=120) for _ in range(60)]
            codes, reasons = _outcomes(futures)
            # held calls are worked off or refused as load, none cancelled
            assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, (codes, reasons)
            assert codes["OK"] >= 2, codes
            # a refusal is grpc's call cap (running + queued + streams) or the queue's (or
            # grpc core's pending-call limit, on a grpc whose server path applies it)
            assert set(reasons) <= {
                "OVERLOADED",
                "grpc: Concurrent RPC limit exceeded!",
                "grpc: Too many pending requests for this server",
            }, reasons
            assert sum(reasons.values()) == codes["RESOURCE_EXHAUSTED"]
            admission = running.running.admission
            assert admission is not None
            assert (admission.running, admission.queued, admission.inflight_bytes) == (0, 0, 0)
            assert health_status(channel) == 1
            assert len(stub.Predict(request, timeout=30).predictions) == 1
    finally:
        running.close()


def test_beyond_the_bound_grpc_cancels_a_held_call(models_root: Path, tmp_path: Path, feature_rows):
    """What a caller sees beyond UNREQUESTED_CALL_TIMEOUT_SECONDS (far beyond any sane deadline
    by default): grpc's core cancels the call, CANCELLED; the server stays healthy."""
    running = InProcessServer(
        server_settings(
            models_root,
            unrequested_call_timeout_seconds=1,
            feedback_data_dir=tmp_path / "data",
        )
    )
    try:
        request = pb.PredictRequest(inputs=[feature_input(feature_rows[0])])
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            stub.Predict(request, timeout=30)
            _stall(running, 3.0)
            futures = [stub.Predict.future(request, timeout=120) for _ in range(20)]
            codes, _ = _outcomes(futures)
            assert set(codes) <= {"OK", "CANCELLED"}, codes
            assert codes["CANCELLED"] >= 1, codes
            assert health_status(channel) == 1
            assert len(stub.Predict(request, timeout=30).predictions) == 1
    finally:
        running.close()
