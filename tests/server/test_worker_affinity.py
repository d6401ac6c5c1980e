"""WORKER_CPU_AFFINITY=auto: each worker of a WORKERS=2 server pinned, every thread of it, to a
CPU of its own (the same one again after a restart), and left to the kernel with ``off`` (the
default) or when there are not exactly as many CPUs as workers. Real supervisor and worker
processes; the masks are read from /proc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import feature_input, start_server

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.devtools.launcher import ServerProcess
from xylen_server.errors import SettingsError
from xylen_server.settings import Settings
from xylen_server.workers import worker_cpus

ALLOWED = sorted(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 CPUs to pin 2 workers apart")


def workers_of(server: ServerProcess) -> list[dict[str, Any]]:
    """The supervisor's /health list of workers (200 or 503)."""
    try:
        with urllib.request.urlopen(f"{server.metrics_url}/health", timeout=10) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:  # 503 while a worker is not ready: same JSON
        body = exc.read()
    workers = json.loads(body)["workers"]
    assert isinstance(workers, list)
    return workers


def predict(server: ServerProcess) -> pb.PredictResponse:
    """One Predict on a connection of its own (the kernel picks the worker per connection)."""
    own = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(server.address, options=own) as channel:
        request = pb.PredictRequest(inputs=[feature_input([0.001 * i for i in range(25)])])
        return pb_grpc.ModelServiceStub(channel).Predict(request, timeout=30)


def cpus_of(pid: int) -> dict[int, set[int]]:
    """Every thread of ``pid`` and the CPUs it may run on."""
    masks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with_mask = (task / "status").read_text().split("Cpus_allowed_list:", 1)[1]
        masks[int(task.name)] = _cpu_list(with_mask.split("\n", 1)[0].strip())
    return masks


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def restricted_to(cpus: set[int]) -> Callable[[], None]:
    """A Popen ``preexec_fn``: the server starts with only ``cpus`` (as under a cpuset)."""
    return lambda: os.sched_setaffinity(0, cpus)


def test_auto_gives_each_worker_the_next_allowed_cpu():
    assert worker_cpus("auto", 2, [5, 1]) == [1, 5]
    assert worker_cpus("auto", 3, [2, 0, 1]) == [0, 1, 2]
    assert worker_cpus("AUTO", 1, [7]) == [7]


def test_fewer_or_more_cpus_than_workers_or_off_pins_none():
    assert worker_cpus("auto", 3, [0, 1]) == [-1, -1, -1]
    # A quota of 2 CPUs on a 4-CPU node: pinning would put every such server on CPUs 0 and 1.
    assert worker_cpus("auto", 2, [0, 1, 2, 3]) == [-1, -1]
    assert worker_cpus("off", 2, [0, 1]) == [-1, -1]


def test_the_setting_is_auto_or_off():
    assert Settings.from_env({}).worker_cpu_affinity == "off"
    assert Settings.from_env({"WORKER_CPU_AFFINITY": "AUTO"}).worker_cpu_affinity == "auto"
    with pytest.raises(SettingsError, match="WORKER_CPU_AFFINITY"):
        Settings.from_env({"WORKER_CPU_AFFINITY": "0,1"})


def _root(models_root: Path, tmp_path: Path) -> Path:
    shutil.copytree(models_root / "model_1", tmp_path / "models" / "model_1")
    return tmp_path


def _env(root: Path, **extra: str) -> dict[str, str]:
    return {
        "WORKERS": "2",
        "FEEDBACK_DATA_DIR": str(root / "data"),
        "RETRAIN_AUTO": "false",
        "PARITY_PROBE_ROWS": "256",
        **extra,
    }


@two_cpus
def test_each_worker_runs_on_a_cpu_of_its_own_and_keeps_it_after_a_restart(
    models_root: Path, tmp_path: Path
):
    root = _root(models_root, tmp_path)
    cpus = set(ALLOWED[-2:])  # not necessarily from 0: the i-th *allowed* CPU is used
    server = start_server(
        root / "models",
        env=_env(root, WORKER_CPU_AFFINITY="auto"),
        log_dir=root / "logs",
        preexec=restricted_to(cpus),
    )
    try:
        workers = workers_of(server)
        assert [w["cpu"] for w in workers] == sorted(cpus)
        for worker in workers:
            masks = cpus_of(worker["pid"])
            assert len(masks) > 3  # grpc's and onnxruntime's threads too, not only the main one
            assert all(mask == {worker["cpu"]} for mask in masks.values()), masks
        assert set(cpus_of(server.proc.pid)[server.proc.pid]) == cpus  # supervisor unpinned
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: predict(server), range(32)))
        assert all(len(a.predictions) == 1 for a in answers)

        killed = workers[1]["pid"]
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while True:
            again = workers_of(server)[1]
            if again["restarts"] == 1 and again["ready"]:
                break
            assert time.monotonic() < deadline, "worker 1 was not restarted"
            time.sleep(0.1)
        assert again["pid"] != killed
        assert again["cpu"] == workers[1]["cpu"]
        assert all(mask == {again["cpu"]} for mask in cpus_of(again["pid"]).values())
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("cpus", "extra"),
    [
        # The default (off): two workers on two CPUs, each left free to run on either.
        pytest.param(ALLOWED[:2], {}, marks=two_cpus, id="default-off"),
        # Two workers on one CPU: pinning could only stack them, so none is.
        pytest.param(ALLOWED[:1], {"WORKER_CPU_AFFINITY": "auto"}, id="auto-fewer-cpus"),
    ],
)
def test_unpinned_workers_keep_every_cpu_the_server_was_given(
    models_root: Path, tmp_path: Path, cpus: list[int], extra: dict[str, str]
):
    root = _root(models_root, tmp_path)
    server = start_server(
        root / "models",
        env=_env(root, **extra),
        log_dir=root / "logs",
        preexec=restricted_to(set(cpus)),
    )
    try:
        workers = workers_of(server)
        assert [w["cpu"] for w in workers] == [-1, -1]
        for worker in workers:
            assert all(mask == set(cpus) for mask in cpus_of(worker["pid"]).values())
        assert len(predict(server).predictions) == 1
    finally:
        server.stop()
