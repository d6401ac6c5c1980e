"""``python -m bench swaps``' measuring parts that are not the benchmark itself: the swaps are
driven from a process of their own (so the measuring client holds nothing but its load), and a
thread's own counts (CPU, faults, switches) are read from /proc (real threads, real processes,
a real gRPC server on a free loopback port)."""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from bench.bench_swaps import (
    ADMIN_TOKEN,
    ProcessDriver,
    _process_counts,
    _thread_counts,
    tlb_shootdowns,
)
from xylen.v1 import model_service_pb2 as pb

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the bench reads Linux's /proc"
)


class _Rollbacks(grpc.GenericRpcHandler):
    """A stand-in ModelService that answers RollbackModel (taking ~20 ms) and records every
    call's version, token and the thread it arrived on."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != "/xylen.v1.ModelService/RollbackModel":
            return None

        def rollback(
            request: pb.RollbackModelRequest, context: grpc.ServicerContext
        ) -> pb.RollbackModelResponse:
            token = dict(context.invocation_metadata()).get("authorization", "")
            time.sleep(0.02)
            with self.lock:
                self.calls.append((request.version, str(token)))
            return pb.RollbackModelResponse(previous_version=3 - request.version)

        return grpc.unary_unary_rpc_method_handler(
            rollback,
            request_deserializer=pb.RollbackModelRequest.FromString,
            response_serializer=pb.RollbackModelResponse.SerializeToString,
        )


def test_swaps_are_driven_from_another_process_alternating_versions() -> None:
    handler = _Rollbacks()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        target_v = [2]
        driver = ProcessDriver(f"127.0.0.1:{port}", target_v, 0.0)
        client_before = _process_counts(os.getpid())
        driver.start()
        deadline = time.monotonic() + 60
        while len(handler.calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        durations = driver.stop()
        assert not driver._process.is_alive()
    finally:
        server.stop(None)
    versions = [version for version, _ in handler.calls]
    # Every call the server saw is one the driver timed, back to back from version 2 on.
    assert len(versions) >= 4 and len(durations) == len(versions)
    assert versions == [2 if i % 2 == 0 else 1 for i in range(len(versions))]
    assert all(d >= 0.02 for d in durations)
    # The next round starts where this one stopped.
    assert target_v == [3 - versions[-1]]
    # The admin token went with every call.
    assert {token for _, token in handler.calls} == {f"Bearer {ADMIN_TOKEN}"}
    # The driver's process made the calls: this process's own CPU did not pay for its ~1 s
    # start (interpreter, grpc) -- a driver thread would have.
    client_after = _process_counts(os.getpid())
    assert client_after[0] - client_before[0] < sum(durations) + 0.5


def test_a_threads_own_counts_follow_what_it_does() -> None:
    pid, tid = os.getpid(), threading.get_native_id()
    before = _thread_counts(pid, tid)
    for _ in range(30):
        time.sleep(0.001)  # each sleep is a voluntary switch
    spun = time.thread_time() + 0.1
    while time.thread_time() < spun:
        pass
    after = _thread_counts(pid, tid)
    user, system, faults, voluntary, involuntary, waited = (
        b - a for a, b in zip(before, after, strict=True)
    )
    assert voluntary >= 30
    # 0.1 s of CPU (much of it system time: reading the thread's clock is a system call),
    # counted in clock ticks.
    assert user + system >= 0.05
    assert faults >= 0 and involuntary >= 0 and waited >= 0
    # Another thread's counts are its own: a sleeping thread gains no CPU from this one's spin.
    idle = threading.Event()
    other: list[int] = []

    def sleep() -> None:
        other.append(threading.get_native_id())
        idle.wait()

    sleeper = threading.Thread(target=sleep)
    sleeper.start()
    while not other:
        time.sleep(0.001)
    first = _thread_counts(pid, other[0])
    spun = time.thread_time() + 0.1
    while time.thread_time() < spun:
        pass
    second = _thread_counts(pid, other[0])
    idle.set()
    sleeper.join()
    assert (second[0] + second[1]) - (first[0] + first[1]) < 0.05


def test_tlb_shootdowns_are_a_count_that_only_grows() -> None:
    first = tlb_shootdowns()
    second = tlb_shootdowns()
    assert isinstance(first, int) and 0 <= first <= second
