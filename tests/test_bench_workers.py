"""``python -m bench workers``' measuring parts that are not the benchmark itself: its options,
the echo floor in two processes on one port, and the split of a process's CPU by kind of
thread (real processes, read from /proc)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from bench.bench_workers import (
    ECHO_METHOD,
    PARTS,
    THREAD_KINDS,
    EchoServers,
    grpc_frame,
    parse_args,
    thread_usage,
)
from xylen.v1 import model_service_pb2 as pb


def test_defaults_run_every_part_and_bad_options_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse_args([])
    assert args.parts == PARTS == ("python", "h2load", "offered")
    assert (args.rate, args.offered_seconds, args.offered_rounds) == (2000, 6.0, 2)
    args = parse_args(["--parts", "offered", "--rate", "1500"])
    assert args.parts == ("offered",) and args.rate == 1500
    for bad in (["--parts", "offered,nope"], ["--parts", ""], ["--rate", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    err = capsys.readouterr().err
    assert "choose from python,h2load,offered" in err and "--rate must be positive" in err


def test_two_echo_processes_share_one_port_and_both_answer() -> None:
    echoes = EchoServers(2)
    try:
        assert len(set(echoes.pids)) == 2
        frame = grpc_frame(pb.PredictRequest(model_name="x"))
        echoes.check(frame)  # the same bytes back, status OK
        channels = [
            grpc.insecure_channel(echoes.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(16)
        ]
        try:
            for channel in channels:
                assert channel.unary_unary(ECHO_METHOD)(b"abc", timeout=10) == b"abc"
            # The kernel hands each connection to one of them (16 connections: both get some,
            # but for a chance of 2 in 65536).
            port = int(echoes.address.rsplit(":", 1)[1])
            held = [len(_accepted(pid, port)) for pid in echoes.pids]
            assert sum(held) >= 16 and min(held) >= 1, held
        finally:
            for channel in channels:
                channel.close()
    finally:
        echoes.stop()
    assert all(p.proc.returncode is not None for p in echoes.processes)


def _accepted(pid: int, port: int) -> set[int]:
    """Socket inodes of the established connections on local ``port`` that ``pid`` holds
    (/proc/net/tcp and tcp6, where grpc's dual-stack sockets are, and the process's fds)."""
    established = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                established.add(int(fields[9]))
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(int(target[8:-1]))
    return established & held


_LIVE = textwrap.dedent(
    """
    import sys, threading, time

    def burn(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    def named():
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write("core-like")
        burn(0.3)
        sys.stdin.read()

    def python():
        burn(0.6)
        sys.stdin.read()

    for target in (python, named):
        threading.Thread(target=target, daemon=True).start()
    time.sleep(0.2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and time.process_time() < 0.9:
        time.sleep(0.05)
    print("done", flush=True)
    sys.stdin.read()
    """
)


def test_thread_usage_splits_live_threads_by_kind() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _LIVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "done"
        before = thread_usage([child.pid])
        time.sleep(0.2)  # every thread now waits on stdin: nothing more is counted
        usage = thread_usage([child.pid])
        loop, python, core = (usage[0, k, 0] for k in range(len(THREAD_KINDS)))
        assert 0.55 <= python < 0.9  # the unnamed thread's 0.6 s
        assert 0.25 <= core < 0.5  # the named one's 0.3 s
        assert loop < 0.25  # the main thread only slept and polled
        assert (usage[0, :, 1] >= before[0, :, 1]).all()  # switches only grow
        assert usage[0, 0, 1] >= 1  # the main thread slept: voluntary switches
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin two echoes")
def test_pinned_echo_processes_run_every_thread_on_a_cpu_of_their_own() -> None:
    echoes = EchoServers(2, pinned=True)
    try:
        echoes.check(grpc_frame(pb.PredictRequest()))
        masks = [
            {
                frozenset(os.sched_getaffinity(int(task.name)))
                for task in Path(f"/proc/{pid}/task").iterdir()
            }
            for pid in echoes.pids
        ]
        cpus = sorted(os.sched_getaffinity(0))
        assert masks == [{frozenset({cpus[0]})}, {frozenset({cpus[1]})}]
    finally:
        echoes.stop()
