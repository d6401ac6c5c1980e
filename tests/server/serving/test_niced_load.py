"""A load's own CPU in the server (building the session, the parity run, timing a row) runs on a
short-lived thread at ``MODEL_LOAD_THREAD_NICE`` when it is above 0, else on the load's own
thread at the server's priority (the default: a niced thread holding the GIL stalls the loop);
no thread that serves afterwards is left niced."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from harness import server_settings

from xylen_server.serving import model_store, session_pool
from xylen_server.serving.model_store import at_lower_priority, load_model
from xylen_server.serving.pacing import CpuShare
from xylen_server.settings import Settings

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's"
)


def _thread_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _niceness_of_every_thread() -> dict[int, int]:
    """Niceness of each live thread of this process, from /proc (field 19 of its stat)."""
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                found[int(tid)] = int(stat.read().rsplit(")", 1)[1].split()[16])
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return found


def test_the_work_runs_niced_on_its_own_thread_and_the_caller_stays_as_it_was() -> None:
    base = _thread_niceness()
    caller = threading.get_native_id()
    tid, niceness = at_lower_priority(4, lambda: (threading.get_native_id(), _thread_niceness()))
    assert tid != caller and niceness == min(19, base + 4)
    assert _thread_niceness() == base
    # Nice 0 runs it right here.
    assert at_lower_priority(0, threading.get_native_id) == caller

    def fails() -> None:
        raise ValueError("from the niced thread")

    with pytest.raises(ValueError, match="from the niced thread"):
        at_lower_priority(4, fails)


@pytest.mark.parametrize("session_threads", [1, 2])
def test_a_load_leaves_no_serving_thread_niced(
    models_root: Path, monkeypatch: pytest.MonkeyPatch, session_threads: int
) -> None:
    base = _thread_niceness()
    niced_calls: list[str] = []
    real = model_store.at_lower_priority

    def recorded(nice: int, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        niced_calls.append(f"{getattr(fn, '__name__', fn)}@{nice}")
        return real(nice, fn, *args, **kwargs)

    monkeypatch.setattr(model_store, "at_lower_priority", recorded)
    settings = server_settings(
        models_root, model_load_thread_nice=6, session_threads=session_threads, pool_size=2
    )
    model = load_model(settings)
    try:
        # The session build (when it starts no thread), the parity run and the timing were niced.
        build = "SessionPool@6" if session_threads == 1 else "SessionPool@0"
        assert niced_calls == [build, "_probe_run@6", "timed@6"]
        # Every thread alive now (the pool's, onnxruntime's intra-op ones) serves at the
        # process's own niceness.
        rows = np.zeros((64, len(model.meta.feature_names)), dtype=np.float32)
        seen = [model.engine.executor.submit(_thread_niceness) for _ in range(8)]
        assert {f.result() for f in seen} == {base}
        model.engine.predict_proba(rows)
        # The short-lived niced threads have been joined, but the kernel may list one for a
        # moment longer while it exits: a serving thread left niced would stay listed.
        for _ in range(100):
            if set(_niceness_of_every_thread().values()) == {base}:
                break
            time.sleep(0.05)
        assert set(_niceness_of_every_thread().values()) == {base}
    finally:
        model.close()


def test_by_default_the_load_runs_on_its_own_thread_at_the_servers_priority(
    models_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MODEL_LOAD_THREAD_NICE 0 (the default): no niced thread is started; the session is
    built, checked and timed on the thread that called the load, whose niceness stays."""
    assert Settings.from_env({}).model_load_thread_nice == 0
    assert Settings.from_env({"MODEL_LOAD_THREAD_NICE": "7"}).model_load_thread_nice == 7
    base = _thread_niceness()
    caller = threading.get_native_id()
    where: list[tuple[str, int, int]] = []

    class Recorded(session_pool.SessionPool):
        def __init__(self, *args: object) -> None:
            where.append(("build", threading.get_native_id(), _thread_niceness()))
            super().__init__(*args)  # type: ignore[arg-type]

    real_probe = model_store._probe_run

    def probe(*args):  # type: ignore[no-untyped-def]
        where.append(("parity", threading.get_native_id(), _thread_niceness()))
        return real_probe(*args)

    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        started.append(thread)
        real_start(thread)

    # load_model imports SessionPool from its module when it runs: the recording one.
    monkeypatch.setattr(session_pool, "SessionPool", Recorded)
    monkeypatch.setattr(model_store, "_probe_run", probe)
    monkeypatch.setattr(threading.Thread, "start", start)
    model = load_model(server_settings(models_root, pool_size=2))
    try:
        assert where == [("build", caller, base), ("parity", caller, base)]
        assert not [t for t in started if t.name == "model-load-niced"]
        assert _thread_niceness() == base
    finally:
        model.close()


def test_a_paced_load_charges_its_warm_up_too(
    models_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the timing on the load's own thread, the load paces once more after the warm-up,
    so the warm-up's CPU is charged (and slept for) like every other step's."""
    events: list[str] = []
    real_warm_up = model_store._warm_up

    def warm_up(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_warm_up(*args, **kwargs)
        events.append("warm-up")
        return result

    class Recorded(CpuShare):
        def pace(self) -> None:
            events.append("pace")
            super().pace()

    monkeypatch.setattr(model_store, "_warm_up", warm_up)
    pacer = Recorded(1.0)
    model = load_model(server_settings(models_root, pool_size=2), pacer=pacer)
    try:
        assert events[-2:] == ["warm-up", "pace"]
        assert pacer.used > 0
    finally:
        model.close()
