"""WORKERS=2 and SIGTERM around a worker's death (xylen_server.workers.Supervisor.run): a
worker that died before the stop (killed just before SIGTERM, waiting out its restart backoff,
or restarting and not yet ready) does not turn an orderly stop into a failure: the supervisor
drains the others and exits 0, and starts nothing again. A worker that was told to drain and
did not (killed while draining) still makes the exit 1. Real supervisors, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
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

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
ROW = [0.001 * (i + 1) for i in range(25)]


@pytest.fixture(scope="module")
def root(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workers-stop")
    shutil.copytree(models_root / "model_1", root / "models" / "model_1")
    return root


def supervisor(root: Path, name: str, **extra: str) -> ServerProcess:
    return start_server(
        root / "models",
        env={
            "WORKERS": "2",
            "FEEDBACK_DATA_DIR": str(root / f"{name}-data"),
            "RETRAIN_AUTO": "false",
            "PARITY_PROBE_ROWS": "256",
            **extra,
        },
        log_dir=root / f"{name}-logs",
    )


def worker_pids(server: ServerProcess) -> list[int]:
    with urllib.request.urlopen(f"{server.metrics_url}/health", timeout=10) as response:
        return [int(w["pid"]) for w in json.loads(response.read())["workers"]]


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(check: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def predict(server: ServerProcess) -> pb.PredictResponse:
    with grpc.insecure_channel(server.address, options=OWN_CONNECTION) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        return stub.Predict(pb.PredictRequest(inputs=[feature_input(ROW)]), timeout=60)


def worker_pids_in_log(log: str, index: int) -> list[int]:
    """Every pid the supervisor started as worker ``index``, in order."""
    marker = f"worker {index} started (pid "
    return [int(part.split(")", 1)[0]) for part in log.split(marker)[1:]]


def died_line(pid: int, backoff: float) -> str:
    return f"worker 1 (pid {pid}) died (signal 9): starting it again in {backoff:.1f}s"


@pytest.mark.parametrize("when", ["at once", "in the restart backoff"])
def test_a_worker_killed_just_before_sigterm_still_stops_with_exit_zero(root: Path, when: str):
    """kill -9 of worker 1, then SIGTERM to the supervisor: at once (the supervisor may not
    have seen the death yet) or once it has logged the death and waits to start it again.
    The stop is orderly: exit 0, worker 0 drained, worker 1 not started again.

    In the backoff: the first wait is 0.5 s, too short a window to be sure the SIGTERM lands
    in it on a loaded machine (the test polls the log). Each worker 1 started again is killed
    at once, so the waits double (0.5, 1, 2, 4 s), and the SIGTERM goes once the supervisor
    has logged a wait of 8 s: a window no scheduling delay closes."""
    name = "killed-now" if when == "at once" else "killed-backoff"
    server = supervisor(root, name)
    first, victim = worker_pids(server)
    victims = [victim]
    os.kill(victim, signal.SIGKILL)
    if when != "at once":
        for backoff in (0.5, 1.0, 2.0, 4.0):
            wait_until(
                lambda b=backoff: died_line(victims[-1], b) in server.log(),
                f"the supervisor to log the death and a wait of {backoff}s",
            )
            again = wait_until(
                lambda: worker_pids_in_log(server.log(), 1)[len(victims) :],
                "the supervisor to start worker 1 again",
            )[0]
            victims.append(again)
            os.kill(again, signal.SIGKILL)
        wait_until(
            lambda: died_line(victims[-1], 8.0) in server.log(),
            "the supervisor to log the death and a wait of 8s",
        )
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(90)
    log = server.log()
    assert code == 0, log[-3000:]
    assert gone(first) and all(gone(pid) for pid in victims)
    assert log.count("stopped cleanly") == 1  # worker 0 drained
    assert worker_pids_in_log(log, 1) == victims, "worker 1 was started again after SIGTERM"
    assert "did not stop" not in log


def test_a_restart_in_progress_at_sigterm_is_stopped_and_the_exit_is_zero(root: Path):
    """kill -9 of worker 1, and SIGTERM once the supervisor has started it again but before
    it is ready (loading its model): the new worker is stopped too, the exit is 0."""
    server = supervisor(root, "restarting")
    first, victim = worker_pids(server)
    os.kill(victim, signal.SIGKILL)
    restarted = wait_until(
        lambda: worker_pids_in_log(server.log(), 1)[1:],
        "the supervisor to start worker 1 again",
    )[0]
    assert "ready" not in server.log().split(f"worker 1 started (pid {restarted})", 1)[1]
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(90)
    log = server.log()
    assert code == 0, log[-3000:]
    assert gone(first) and gone(victim) and gone(restarted)
    assert "did not stop" not in log


def test_a_worker_killed_while_draining_makes_the_exit_non_zero(root: Path):
    """Calls in flight on both workers, SIGTERM, then kill -9 of worker 1 while it drains: its
    calls are lost, so the stop was not orderly: exit 1 (worker 0 still drains its own)."""
    server = supervisor(
        root, "drain-killed", INFERENCE_DELAY_MS="3000", LOOP_INFERENCE_BUDGET_US="0"
    )
    first, victim = worker_pids(server)
    with ThreadPoolExecutor(16) as pool:
        calls = [pool.submit(predict, server) for _ in range(16)]
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: server.log().count("draining for up to") == 2, "both workers to drain")
        os.kill(victim, signal.SIGKILL)
        outcomes = []
        for call in calls:
            try:
                outcomes.append(len(call.result(timeout=90).predictions))
            except grpc.RpcError as exc:
                outcomes.append(exc.code())
    code = server.proc.wait(90)
    log = server.log()
    assert code == 1, log[-3000:]
    assert 1 in outcomes  # worker 0 drained and answered what it had
    assert gone(first) and gone(victim)
    assert log.count("stopped cleanly") == 1
    assert worker_pids_in_log(log, 1) == [victim]


def test_exited_sees_a_kill_before_the_process_has_exited():
    """:func:`~xylen_server.workers.exited` on real children: False while one runs, True at
    once after ``kill -9`` of one with busy threads (which waitid alone may still find
    running while its threads exit), True once it is reaped."""
    import subprocess
    import sys

    from xylen_server.workers import exited

    busy = (
        "import threading, time\n"
        "for _ in range(4):\n"
        "    threading.Thread(target=lambda: [sum(range(10**5)) for _ in iter(int, 1)],"
        " daemon=True).start()\n"
        "print('up', flush=True)\n"
        "time.sleep(120)\n"
    )
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", busy], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        assert exited(child.pid) is False
        os.kill(child.pid, signal.SIGKILL)
        assert exited(child.pid) is True
        assert child.wait(30) == -signal.SIGKILL
        assert exited(child.pid) is True
