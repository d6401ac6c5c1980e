"""A hot swap's load is cheap and keeps to its CPU share (``MODEL_LOAD_CPU_SHARE``).

Each model file is hashed once per load, and once per rollback (the history's verification
hands its digests to the load); a paced load's threads charge their CPU time and sleep, so the
load's CPU stays within share x elapsed plus its longest stretch between two paces, as the
kernel counts it too. Real model directories, real onnxruntime sessions, real threads."""

from __future__ import annotations

import gc
import logging
import resource
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from harness import InProcessServer, server_settings, write_model
from learning_helpers import learning_settings

import training.metadata as metadata
from training.metadata import ONNX_FILE, ModelMetadata
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.errors import SettingsError
from xylen_server.serving import model_store
from xylen_server.serving.model_store import load_model
from xylen_server.serving.pacing import CpuShare
from xylen_server.settings import Settings


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count every file hashed in this process, by file name (the real hashing still runs)."""
    hashed: Counter[str] = Counter()
    real = metadata.sha256_regular_file

    def counted(path: Path, max_bytes: int) -> str:
        hashed[Path(path).name] += 1
        return real(path, max_bytes)

    monkeypatch.setattr(metadata, "sha256_regular_file", counted)
    monkeypatch.setattr(model_store, "sha256_regular_file", counted)
    return hashed


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_a_load_hashes_the_native_file_once_and_the_onnx_only_from_the_bytes_it_serves(
    tmp_path: Path, candles, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = write_model(tmp_path, "model_1", "lightgbm", candles, trees=30)
    settings = server_settings(tmp_path, parity_probe_rows=256)
    load_model(settings).close()  # the first load's child keeps parity.npz
    meta = ModelMetadata.read(model_dir)
    # The checksums name the ONNX file too, as training's do: each file checked still once.
    onnx_sha = metadata.sha256_file(model_dir / ONNX_FILE)
    ModelMetadata(**{**meta.to_dict(), "checksums": {**meta.checksums, ONNX_FILE: onnx_sha}}).write(
        model_dir
    )
    hashed = _count_hashes(monkeypatch)
    loaded = load_model(settings)
    try:
        assert loaded.reference_source == "stored"  # the binding needed both digests
    finally:
        loaded.close()
    assert hashed[meta.native_file] == 1
    assert hashed[ONNX_FILE] == 0  # hashed from the bytes read once, never from the file again
    # A changed ONNX file is still caught by its checksum (the digest is of the bytes read).
    (model_dir / ONNX_FILE).write_bytes((model_dir / ONNX_FILE).read_bytes() + b"\0")
    with pytest.raises(model_store.ModelLoadError, match="corrupt"):
        load_model(settings)


def test_a_rollback_hashes_each_file_once_for_the_verification_and_the_load(
    two_versions: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = InProcessServer(learning_settings(two_versions))
    native = ModelMetadata.read(two_versions / "models" / "model_1").native_file
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            # The first rollback to each version makes its parity.npz (a child); count after.
            stub.RollbackModel(pb.RollbackModelRequest(version=2), timeout=120)
            stub.RollbackModel(pb.RollbackModelRequest(version=1), timeout=120)
            hashed = _count_hashes(monkeypatch)
            reply = stub.RollbackModel(pb.RollbackModelRequest(version=2), timeout=120)
            assert reply.model_info.version == 2
    finally:
        server.close()
    assert hashed[native] == 1  # the history's verification; the load reused its digest


def test_a_damaged_kept_version_is_still_refused_by_the_rollback(
    two_versions: Path,
) -> None:
    kept = two_versions / "models" / ".versions" / "model_1" / "2"
    native = kept / ModelMetadata.read(kept).native_file
    native.write_bytes(native.read_bytes()[:-10])
    server = InProcessServer(learning_settings(two_versions))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.RollbackModel(pb.RollbackModelRequest(version=2), timeout=120)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert "corrupt" in (caught.value.details() or "")
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            assert info.model_info.version == 1
    finally:
        server.close()


class _Recorded(CpuShare):
    """A CpuShare that remembers the CPU charged between two paces (its longest stretch)."""

    def __init__(self, share: float) -> None:
        super().__init__(share)
        self.stretches: list[float] = []
        self._last = 0.0

    def pace(self) -> None:
        self.charge()
        self.stretches.append(self.used - self._last)
        super().pace()
        self._last = self.used


def test_paced_work_keeps_its_thread_cpu_within_the_share() -> None:
    share = 0.2
    # The pacer's time runs from its making, so the kernel's elapsed is read from before it:
    # a thread that started late (a loaded machine) must not shorten the test's window only.
    started = time.perf_counter()
    pacer = _Recorded(share)
    measured = {}

    def work() -> None:
        cpu0 = time.thread_time()
        pacer.enter()
        for _ in range(20):
            spin = time.thread_time() + 0.002  # 2 ms of CPU, then a pace
            while time.thread_time() < spin:
                pass
            pacer.pace()
        measured["cpu"] = time.thread_time() - cpu0
        measured["elapsed"] = time.perf_counter() - started

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    # The kernel's count of the thread's CPU, not the pacer's own, keeps to the share (one
    # stretch of slack: a pace can only look back).
    assert measured["cpu"] >= 0.04
    assert measured["cpu"] <= share * measured["elapsed"] + max(pacer.stretches)
    assert pacer.slept > 0
    assert pacer.used == pytest.approx(measured["cpu"], rel=0.2)


def test_a_share_of_one_only_counts() -> None:
    pacer = CpuShare(1.0)
    pacer.enter()
    spin = time.thread_time() + 0.01
    while time.thread_time() < spin:
        pass
    pacer.pace()
    assert pacer.slept == 0.0 and pacer.used >= 0.01
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            CpuShare(bad)


def test_a_paced_load_keeps_the_process_cpu_within_the_share(tmp_path: Path, candles) -> None:
    write_model(tmp_path, "model_1", "lightgbm", candles, trees=300)
    settings = server_settings(tmp_path, parity_probe_rows=2048)
    load_model(settings).close()  # the child keeps parity.npz; the next loads are the server's
    load_model(settings).close()
    share = 0.05
    pacer = _Recorded(share)
    cpu0, started = _process_cpu(), time.perf_counter()
    loaded = load_model(settings, pacer=pacer)
    elapsed, cpu = time.perf_counter() - started, _process_cpu() - cpu0
    loaded.close()
    # Several paces, the parity run's chunks among them; the load slept for its share.
    assert len(pacer.stretches) >= 2048 // model_store.PARITY_CHUNK_ROWS
    assert pacer.slept > 0
    # The CPU charged kept to the share, give or take the longest stretch between two paces
    # (a pace can only look back) ...
    assert pacer.used <= share * elapsed + max(pacer.stretches)
    # ... and it is most of what the kernel counted for the whole process meanwhile (the rest:
    # the pool's threads warming up after the last pace), so no thread of the load escapes it.
    assert pacer.used >= 0.6 * cpu


def test_a_swap_is_paced_at_the_setting_and_says_so(
    two_versions: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = InProcessServer(learning_settings(two_versions, model_load_cpu_share=0.04))
    try:
        with grpc.insecure_channel(server.address) as channel, caplog.at_level(logging.INFO):
            stub = pb_grpc.ModelServiceStub(channel)
            reply = stub.RollbackModel(pb.RollbackModelRequest(version=2), timeout=120)
            assert reply.model_info.version == 2
    finally:
        server.close()
    lines = [r.getMessage() for r in caplog.records if "rolled back to v2" in r.getMessage()]
    assert len(lines) == 1
    assert "(share 0.04, slept " in lines[0]  # the setting, not the default (0.05)
    assert "slept 0 ms" not in lines[0]


def test_the_share_setting_is_bounded() -> None:
    assert Settings.from_env({}).model_load_cpu_share == 0.05
    assert Settings.from_env({"MODEL_LOAD_CPU_SHARE": "1"}).model_load_cpu_share == 1.0
    for bad in ("0", "1.5", "-0.1", "x"):
        with pytest.raises(SettingsError, match="MODEL_LOAD_CPU_SHARE"):
            Settings.from_env({"MODEL_LOAD_CPU_SHARE": bad})


def test_the_cpu_a_pace_spends_around_its_sleep_is_charged_too() -> None:
    """Whatever the thread's CPU does between a charge and the next one is the load's, the
    wake-up from a pace's sleep included: a garbage collection landing there (the server's
    heap is large, a full collection takes milliseconds) was not charged, and a loaded
    machine's swaps ran past their share. Here every collection in the worker burns 1 ms,
    and collections follow every allocation."""
    share, burn = 0.2, 0.001
    started = time.perf_counter()
    pacer = _Recorded(share)
    measured: dict[str, float] = {}
    worker: list[int] = []

    def slow_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and worker and threading.get_ident() == worker[0]:
            end = time.thread_time() + burn
            while time.thread_time() < end:
                pass

    def work() -> None:
        worker.append(threading.get_ident())
        cpu0 = time.thread_time()
        pacer.enter()
        for _ in range(10):
            spin = time.thread_time() + 0.002
            while time.thread_time() < spin:
                pass
            pacer.pace()
        measured["cpu"] = time.thread_time() - cpu0
        measured["elapsed"] = time.perf_counter() - started

    thresholds = gc.get_threshold()
    gc.callbacks.append(slow_collection)
    gc.set_threshold(1)
    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(slow_collection)
    assert pacer.slept > 0
    assert measured["cpu"] <= share * measured["elapsed"] + max(pacer.stretches)
    assert pacer.used == pytest.approx(measured["cpu"], rel=0.1)
