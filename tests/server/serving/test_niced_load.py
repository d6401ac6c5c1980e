"""A load's own CPU in the server (building the session, the parity run, timing a row) runs on a
short-lived thread at ``MODEL_LOAD_NICE``; no thread that serves afterwards is left niced."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from harness import server_settings

from xylen_server.serving import model_store
from xylen_server.serving.model_store import at_lower_priority, load_model

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
        models_root, model_load_nice=6, session_threads=session_threads, pool_size=2
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
