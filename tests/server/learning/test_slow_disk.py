"""A slow disk under a live server: its feedback store and prediction log on a real FUSE
filesystem (tests/slowfs.py, its own process) that sleeps before every write and fsync.

Predict keeps answering (the prediction log is written off the request path), Feedback is
slower but every acknowledged record survives a kill -9, and the slowness shows in the log.
The same run on the ordinary disk, side by side, gives the figures to compare (printed, not
asserted: no wall-clock limits in tests). Skipped, saying why, only where FUSE cannot mount.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from harness import feature_input, start_server, write_model
from learning_helpers import feedback

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.learning.feedback_store import FeedbackStore

SLOWFS = Path(__file__).resolve().parents[2] / "slowfs.py"
WRITE_DELAY_MS = 2
FSYNC_DELAY_MS = 50
FEEDBACK_WRITERS = 6
PREDICT_CALLERS = 2
ACKNOWLEDGED_BEFORE_KILL = 150


@dataclass
class SlowDisk:
    mount: Path
    backing: Path
    stats: str = ""


def _unmount(mount: Path) -> None:
    for command in (["fusermount", "-u", "-z"], ["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if shutil.which(command[0]) is None:
            continue
        done = subprocess.run([*command, str(mount)], capture_output=True, text=True)
        if done.returncode == 0 or not os.path.ismount(mount):
            return


@contextlib.contextmanager
def slow_disk(root: Path, write_ms: float, fsync_ms: float) -> Iterator[SlowDisk]:
    """A passthrough FUSE filesystem over ``root/backing`` mounted at ``root/mount`` whose
    writes and fsyncs sleep; unmounted at the end whatever happened."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("FUSE cannot mount here: no /dev/fuse")
    if not (shutil.which("fusermount") or shutil.which("fusermount3")):
        pytest.skip("FUSE cannot mount here: no fusermount (Debian: apt-get install fuse3)")
    disk = SlowDisk(root / "mount", root / "backing")
    disk.mount.mkdir(parents=True)
    disk.backing.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, str(SLOWFS), disk.backing, disk.mount, str(write_ms), str(fsync_ms)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(disk.mount):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                _, err = proc.communicate()
                reason = (err.strip().splitlines() or ["no mount within 30 s"])[-1][:200]
                pytest.skip(f"FUSE cannot mount here: {reason}")
            time.sleep(0.02)
        yield disk
    finally:
        _unmount(disk.mount)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        disk.stats = out.strip().splitlines()[-1] if out and out.strip() else ""


@dataclass
class Phase:
    acknowledged: set[str] = field(default_factory=set)
    feedback_seconds: float = 0.0
    predict_latencies: list[float] = field(default_factory=list)
    predict_failures: list[str] = field(default_factory=list)
    feedback_failures: list[str] = field(default_factory=list)
    log: str = ""

    @property
    def feedback_rate(self) -> float:
        return len(self.acknowledged) / self.feedback_seconds

    def predict_ms(self, q: float) -> float:
        return statistics.quantiles(self.predict_latencies, n=100)[int(q) - 1] * 1000


def run_and_kill(models: Path, data: Path, logs: Path, feature_rows) -> Phase:
    """A real server with its data under ``data``: Predict callers and Feedback writers run at
    once; with ``ACKNOWLEDGED_BEFORE_KILL`` acknowledged the Predict callers stop and the server
    is killed with SIGKILL while the writers are mid-stream."""
    env = {
        "FEEDBACK_DATA_DIR": str(data),
        "RETRAIN_AUTO": "false",
        "FEEDBACK_SLOW_COMMIT_MS": str(FSYNC_DELAY_MS / 2),
        "PREDICTION_LOG_FLUSH_INTERVAL_SECONDS": "0.2",  # parts written all along the run
    }
    server = start_server(models, env=env, log_dir=logs)
    phase = Phase()
    lock = threading.Lock()
    stop_predict, stop_feedback = threading.Event(), threading.Event()

    def predict_caller(k: int) -> None:
        with server.channel() as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            i = 0
            while not stop_predict.is_set():
                rows = [feature_input(feature_rows[(i + j) % 1000]) for j in range(8)]
                started = time.perf_counter()
                try:
                    stub.Predict(pb.PredictRequest(inputs=rows), timeout=10)
                except grpc.RpcError as error:
                    phase.predict_failures.append(str(error.code()))  # type: ignore[attr-defined]
                    return
                with lock:
                    phase.predict_latencies.append(time.perf_counter() - started)
                i += 8 + k

    def feedback_writer(k: int) -> None:
        with server.channel() as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            i = 0
            while not stop_feedback.is_set():
                pid = f"w{k}-{i}"
                try:
                    answer = stub.Feedback(feedback(pid, 0.01, feature_rows[i % 1000]), timeout=30)
                except grpc.RpcError as error:
                    if not stop_feedback.is_set():  # before the kill: a real failure
                        phase.feedback_failures.append(str(error.code()))  # type: ignore[attr-defined]
                    return  # killed: this one was not acknowledged
                assert not answer.duplicate
                with lock:
                    phase.acknowledged.add(answer.prediction_id)
                i += 1

    predictors = [
        threading.Thread(target=predict_caller, args=(k,)) for k in range(PREDICT_CALLERS)
    ]
    writers = [threading.Thread(target=feedback_writer, args=(k,)) for k in range(FEEDBACK_WRITERS)]
    try:
        for thread in predictors:
            thread.start()
        started = time.perf_counter()
        for thread in writers:
            thread.start()
        give_up = time.monotonic() + 120
        while len(phase.acknowledged) < ACKNOWLEDGED_BEFORE_KILL and time.monotonic() < give_up:
            if phase.feedback_failures or phase.predict_failures:
                break
            time.sleep(0.01)
        phase.feedback_seconds = time.perf_counter() - started
        stop_predict.set()
        for thread in predictors:
            thread.join(30)
        stop_feedback.set()
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        stop_predict.set()
        stop_feedback.set()
        server.stop(signal.SIGKILL)
        for thread in predictors + writers:
            thread.join(30)
    phase.log = server.log()
    return phase


def stored_ids(directory: Path) -> list[str]:
    with FeedbackStore(directory, compact_on_close=False) as store:
        return store.read_samples().get_column("prediction_id").to_list()


def test_slow_disk_slows_feedback_not_predict_and_loses_nothing(
    tmp_path: Path, candles, feature_rows
):
    models = tmp_path / "models"
    write_model(models, "model_1", "lightgbm", candles, trees=20)

    normal = run_and_kill(models, tmp_path / "normal", tmp_path, feature_rows)
    with slow_disk(tmp_path / "slow", WRITE_DELAY_MS, FSYNC_DELAY_MS) as disk:
        slow = run_and_kill(models, disk.mount / "data", tmp_path, feature_rows)
    # Unmounted now: what the server had fsynced is in the backing directory.
    slow_ids = stored_ids(disk.backing / "data" / "model_1")
    normal_ids = stored_ids(tmp_path / "normal" / "model_1")

    print(
        f"\nslow disk ({WRITE_DELAY_MS} ms per write, {FSYNC_DELAY_MS} ms per fsync; "
        f"FUSE {disk.stats}): Feedback {slow.feedback_rate:.0f}/s vs "
        f"{normal.feedback_rate:.0f}/s on the normal disk "
        f"({normal.feedback_rate / slow.feedback_rate:.1f}x slower), {FEEDBACK_WRITERS} writers; "
        f"Predict (8 rows, {PREDICT_CALLERS} callers) answered {len(slow.predict_latencies)} "
        f"meanwhile, p50 {slow.predict_ms(50):.1f} ms p99 {slow.predict_ms(99):.1f} ms max "
        f"{max(slow.predict_latencies) * 1000:.0f} ms (normal disk: "
        f"{len(normal.predict_latencies)} answered, p50 {normal.predict_ms(50):.1f} ms "
        f"p99 {normal.predict_ms(99):.1f} ms max {max(normal.predict_latencies) * 1000:.0f} ms); "
        f"kill -9: {len(slow.acknowledged)} / {len(normal.acknowledged)} acknowledged, "
        f"{len(slow.acknowledged - set(slow_ids))} / "
        f"{len(normal.acknowledged - set(normal_ids))} lost"
    )
    for phase, ids in ((normal, normal_ids), (slow, slow_ids)):
        assert not phase.predict_failures and not phase.feedback_failures
        assert len(phase.acknowledged) >= ACKNOWLEDGED_BEFORE_KILL
        assert len(phase.predict_latencies) >= 50  # Predict answered all along
        assert len(ids) == len(set(ids)), "a record was stored twice"
        assert phase.acknowledged <= set(ids), "an acknowledged record was lost"
    # The slow disk was the one written to, and the server said so.
    fsyncs = int(disk.stats.split("fsyncs=")[1].split()[0])
    assert fsyncs >= 10
    assert "slow feedback disk" in slow.log
