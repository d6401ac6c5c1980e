"""``python -m bench server``'s host line (the processor and its caches), and its pinned lone
Predict: the servers run on the CPU ``taskset`` gives them, the client on its own for the run
and on all of its CPUs again after it. Real server processes, real model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
import pytest

from bench.bench_server import (
    build_model,
    host_cpu,
    pinned_cpus,
    start_server,
    without_the_engine,
    xylen_env,
)
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2

CPUS = pinned_cpus()
NEEDS_TWO = pytest.mark.skipif(CPUS is None, reason="needs two CPUs and taskset")


@NEEDS_TWO
def test_a_server_started_under_taskset_runs_on_that_cpu_and_answers(tmp_path: Path) -> None:
    assert CPUS is not None
    _, rows = build_model(tmp_path, trees=5)
    server = start_server(
        xylen_env(tmp_path), python=["taskset", "-c", str(CPUS[1]), sys.executable]
    )
    try:
        # taskset execs the interpreter: the pid is the server's, every thread on the one CPU.
        threads = os.listdir(f"/proc/{server.proc.pid}/task")
        assert len(threads) > 1
        for tid in threads:
            assert os.sched_getaffinity(int(tid)) == {CPUS[1]}
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            answer = pb_grpc.ModelServiceStub(channel).Predict(
                pb.PredictRequest(
                    inputs=[
                        pb.PredictInput(features=types_pb2.FeatureVector(values=rows[0].tolist()))
                    ]
                ),
                timeout=30,
            )
        assert 0.0 <= answer.predictions[0].probability_up <= 1.0
    finally:
        server.stop()


@NEEDS_TWO
def test_the_pinned_lone_run_measures_every_target_and_gives_the_client_its_cpus_back(
    tmp_path: Path,
) -> None:
    assert CPUS is not None
    _, rows = build_model(tmp_path, trees=5)
    before = os.sched_getaffinity(0)
    loads = without_the_engine(tmp_path, rows, 0.3, pinned=CPUS)
    assert os.sched_getaffinity(0) == before
    assert len(loads) == 5
    for (label, level), load in loads.items():
        assert level == 1
        assert load.calls > 0 and not load.errors, (label, load.errors)


def test_the_bench_names_the_host_it_measured() -> None:
    with open("/proc/cpuinfo") as info:
        models = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    named = host_cpu()
    assert named.startswith(models[0] if models else "unknown CPU")
    l2 = [
        (index / "size").read_text().strip()
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")
        if (index / "level").read_text().strip() == "2"
    ]
    if l2:
        assert f"L2 {l2[0]}" in named
