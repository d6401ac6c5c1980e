"""Predict latency while hot swaps run back to back, against the same load without swaps.

A server process serves a 500-tree LightGBM model with two kept versions; a client keeps
``--in-flight`` unary Predict calls (batch 1) going. Rounds alternate: load alone, then load
while another process calls RollbackModel between the two versions back to back (each a full
load in the server: the history's checks, the checksums, the stored parity reference
(``parity.npz``: no child process once each version has one), one ONNX Runtime session built
off the loop, the parity run, warm-up, install, an atomic swap), or one every
``--swap-every`` seconds. The ratio is p99 during swaps over p99 without, medians over the
rounds, so machine noise hits both alike. Target: within 2x.

Beside the latencies, figures that depend less on how busy the machine is: the event loop's
worst lateness during each swap and per step (the server's own probe, :class:`xylen_server.
versions.swap.LoopLag`, read from its log; "n/a" for a server without it), the CPU the swap's
own threads charged and how long they slept (``MODEL_LOAD_CPU_SHARE``), the server's CPU per
Predict with and without swaps (all threads, and its main thread: the event loop) and per swap
beyond its Predicts, any parity children's CPU; the event loop's thread apart from the rest
(its user and system CPU, minor faults, waits, preemptions and run-queue time per Predict), the
measuring client's own CPU and switches, TLB shootdowns per swap; the longest GIL wait while a
session is built on a thread at nice 10 against 0 beside a busy process on the same core
(``MODEL_LOAD_THREAD_NICE``, a few seconds); and, first, building the model's ONNX Runtime
session in the bench's own process: CPU per build and the longest GIL hold, as served and with
optimizations off or a pre-optimized ORT-format model (a few seconds).

Attribution: each Predict's start and end (``time.perf_counter``, CLOCK_MONOTONIC, the clock
the server's swap log line gives its start on) are laid beside the swaps' steps: the slowest 1%
of calls during swaps are counted by the step they overlapped most, against each step's share
of the time. ``bench/gcprobe/sitecustomize.py`` (on the server's ``PYTHONPATH``) records every
garbage collection in the server: collections a second, pauses, and how many slow calls
overlapped one, with and without swaps.

    python -m bench swaps                              # ~1 minute
    python -m bench.bench_swaps --source /path         # the same against another checkout
    python -m bench.bench_swaps --baseline /work/main  # before/after in one run (~2.5 minutes)
    python -m bench.bench_swaps --swap-every 1         # one swap a second instead of back to back
    python -m bench.bench_swaps --baseline . --baseline-env MODEL_LOAD_CPU_SHARE=1
                                                       # two settings of one tree side by side
    python -m bench.bench_swaps --baseline . --baseline-swaps-in-client
                                                       # swaps driven from a thread of the
                                                       # measuring client (the old harness)

``--baseline TREE`` runs TREE's server too (with ``TREE/.venv/bin/python`` when there is one,
so its own dependencies count), alternating rounds between the two so noise hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.bench_server import REPO, Process, build_model, start_xylen
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2
from xylen_server.auth import with_token

ADMIN_TOKEN = "bench-admin-token"
_LAG = re.compile(rb"event loop late by at most ([0-9.]+) ms")
_STEPS = re.compile(rb"steps, seconds/worst lateness: ([^)]*)\)")
_STEP = re.compile(r"([a-z-]+) ([0-9.]+)s/([0-9.]+)ms")
_TIMELINE = re.compile(
    rb"steps, seconds/worst lateness: ([^)]*)\) \(began at monotonic ([0-9.]+)\)"
)
_LOAD = re.compile(rb"load CPU ([0-9]+) ms in ([0-9]+) ms \(share ([0-9.]+), slept ([0-9]+) ms\)")
_TICKS = os.sysconf("SC_CLK_TCK")
GC_PROBE = Path(__file__).resolve().parent / "gcprobe"
"""Directory of the ``sitecustomize`` that records every garbage collection of a server."""


async def _load(
    address: str, request: pb.PredictRequest, in_flight: int, seconds: float
) -> list[tuple[float, float]]:
    """(start on ``time.perf_counter``, latency) in seconds of unary Predicts kept
    ``in_flight`` at once for ``seconds``."""
    samples: list[tuple[float, float]] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        for _ in range(50):
            await stub.Predict(request)
        stop = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                await stub.Predict(request, timeout=30)
                samples.append((started, time.perf_counter() - started))

        await asyncio.gather(*(caller() for _ in range(in_flight)))
    return samples


def _p(samples: list[tuple[float, float]], q: float) -> float:
    ordered = sorted(latency for _, latency in samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e6


def _second_version(model_dir: Path) -> None:
    """Turn the served directory into version 2 of the same model (its files unchanged)."""
    meta_path = model_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = 2
    meta_path.write_text(json.dumps(meta, indent=2))


def _cpu(pid: int) -> tuple[float, float]:
    """(the process's own, its waited-for children's) user + system CPU seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / _TICKS
    children = (int(fields[13]) + int(fields[14])) / _TICKS
    return own, children


def _thread_counts(pid: int, tid: int) -> list[float]:
    """Thread ``tid`` of process ``pid`` so far: user and system CPU seconds, minor page faults,
    voluntary and involuntary context switches, and seconds spent runnable but waiting for a
    CPU (``schedstat``). A voluntary switch of the event-loop thread is a wait: for its sockets
    (epoll) or for the GIL another thread holds; the run-queue wait is time it was ready and got
    no core."""
    base = f"/proc/{pid}/task/{tid}"
    with open(f"{base}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    with open(f"{base}/status") as status:
        switches = {
            line.split(":")[0]: int(line.split(":")[1])
            for line in status
            if "ctxt_switches" in line
        }
    try:
        with open(f"{base}/schedstat") as sched:
            waited = int(sched.read().split()[1]) / 1e9
    except OSError:  # a kernel without schedstats
        waited = 0.0
    return [
        int(fields[11]) / _TICKS,
        int(fields[12]) / _TICKS,
        int(fields[7]),
        switches.get("voluntary_ctxt_switches", 0),
        switches.get("nonvoluntary_ctxt_switches", 0),
        waited,
    ]


def _process_counts(pid: int) -> list[float]:
    """Process ``pid`` so far (every thread, dead ones too): user and system CPU seconds and
    minor page faults."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return [int(fields[11]) / _TICKS, int(fields[12]) / _TICKS, int(fields[7])]


def tlb_shootdowns() -> int:
    """TLB shootdown interrupts so far, all CPUs (``/proc/interrupts``; 0 where not listed).
    Machine-wide: other processes' count too, so compare rounds with and without swaps."""
    try:
        with open("/proc/interrupts") as interrupts:
            for line in interrupts:
                if line.strip().startswith("TLB:"):
                    return sum(int(x) for x in line.split()[1:] if x.isdigit())
    except OSError:
        pass
    return 0


def _loop_lags(server: Process) -> list[float]:
    """Worst event-loop lateness (ms) of each swap so far, from the server's log (read with
    pread: the server shares the file offset)."""
    fd = server.log.fileno()
    return [float(m) for m in _LAG.findall(os.pread(fd, os.fstat(fd).st_size, 0))]


def _step_lags(server: Process) -> list[dict[str, tuple[float, float]]]:
    """Per swap so far: each step's (seconds, the loop's worst lateness in ms), from the
    server's log ("n/a" for a server that does not report steps)."""
    fd = server.log.fileno()
    found = _STEPS.findall(os.pread(fd, os.fstat(fd).st_size, 0))
    return [
        {m[0]: (float(m[1]), float(m[2])) for m in _STEP.findall(line.decode())} for line in found
    ]


def _print_steps(swaps: list[dict[str, tuple[float, float]]]) -> dict[str, float]:
    """Median seconds and median / largest lateness of each step over ``swaps``."""
    names: list[str] = []
    for swap in swaps:
        names.extend(n for n in swap if n not in names)
    out = {}
    for name in names:
        seen = [swap[name] for swap in swaps if name in swap]
        lates = [late for _, late in seen]
        out[name] = statistics.median(lates)
        print(
            f"    {name:9s} {statistics.median(s for s, _ in seen):6.3f} s median; loop late "
            f"median {statistics.median(lates):5.1f} ms, largest {max(lates):5.1f} ms "
            f"({len(seen)} swaps)"
        )
    return out


def _timeline(server: Process) -> list[tuple[str, float, float]]:
    """Every step of every swap so far as (name, start, end) on perf_counter, from the swap's
    log line (a server that does not log when its swap began gives none)."""
    fd = server.log.fileno()
    spans = []
    for steps, began in _TIMELINE.findall(os.pread(fd, os.fstat(fd).st_size, 0)):
        at = float(began)
        for name, seconds, _ in _STEP.findall(steps.decode()):
            if name != "start":
                spans.append((name, at, at + float(seconds)))
            at += float(seconds)
    return sorted(spans, key=lambda span: span[1])


AFTER = 0.05
"""A Predict within this many seconds after a swap's end counts as "just after a swap" (a new
session's first calls, the old one's closing)."""


def _where(start: float, end: float, spans: list[tuple[str, float, float]]) -> str:
    """The step that overlaps [start, end] most, else whether it ran just after a swap."""
    best, name = 0.0, ""
    for step, a, b in spans:
        if a > end:
            break
        overlap = min(b, end) - max(a, start)
        if overlap > best:
            best, name = overlap, step
    if name:
        return name
    ended = [b for _, a, b in spans if b <= start]
    if ended and start - max(ended) < AFTER:
        return f"<{AFTER * 1e3:.0f} ms after a swap"
    return "between swaps"


def _gc_records(target: Target) -> list[tuple[float, float, int, bool]]:
    """The server's collections (start, seconds, generation, on the main thread)."""
    if target.gc_probe is None or not target.gc_probe.is_file():
        return []
    with open(target.gc_probe) as lines:
        return [tuple(json.loads(line)) for line in lines if line.strip()]  # type: ignore[misc]


def _attribute(target: Target) -> None:
    """Which step of a swap the slowest 1% of Predicts during swaps overlapped most, beside the
    share of the rounds' time each step took (a step that holds slow calls beyond its share of
    time is where the p99 comes from); the collections the server ran with and without swaps,
    and how many slow calls overlapped one."""
    spans = _timeline(target.server)
    gcs = _gc_records(target)
    if spans:
        time_share: dict[str, float] = defaultdict(float)
        total = 0.0
        for w0, w1 in target.swap_windows:
            total += w1 - w0
            for name, a, b in spans:
                time_share[name] += max(0.0, min(b, w1) - max(a, w0))
        slow: Counter[str] = Counter()
        calls: Counter[str] = Counter()
        for samples in target.swap_samples:
            threshold = _p(samples, 0.99) / 1e6
            for start, latency in samples:
                where = _where(start, start + latency, spans)
                calls[where] += 1
                if latency >= threshold:
                    slow[where] += 1
        n_slow, n_calls = sum(slow.values()), sum(calls.values())
        print(
            f"  where the slowest 1% of Predicts during swaps ran ({n_slow} calls at or above "
            "each round's p99), against each step's share of the rounds' time and of all calls:"
        )
        for name in sorted(set(calls) | set(time_share), key=lambda n: -slow[n]):
            print(
                f"    {name:24s} {100 * slow[name] / max(n_slow, 1):5.1f} % of slow calls, "
                f"{100 * time_share[name] / max(total, 1e-9):5.1f} % of the time, "
                f"{100 * calls[name] / max(n_calls, 1):5.1f} % of all calls"
            )
    if gcs:
        for label, windows, rounds in (
            ("without swaps", target.idle_windows, target.idle_samples),
            ("during swaps", target.swap_windows, target.swap_samples),
        ):
            inside = [g for g in gcs if any(w0 <= g[0] <= w1 for w0, w1 in windows)]
            seconds = sum(w1 - w0 for w0, w1 in windows)
            by_gen = Counter(g[2] for g in inside)
            pauses = sorted(g[1] * 1e3 for g in inside)
            hit = slow_hit = n_slow = 0
            for samples in rounds:
                threshold = _p(samples, 0.99) / 1e6
                for start, latency in samples:
                    overlaps = any(g[0] < start + latency and g[0] + g[1] > start for g in inside)
                    hit += overlaps
                    if latency >= threshold:
                        n_slow += 1
                        slow_hit += overlaps
            n_calls = sum(len(samples) for samples in rounds)
            print(
                f"  server GC {label}: {len(inside) / max(seconds, 1e-9):.1f} collections/s "
                f"(gen0/1/2 {by_gen[0]}/{by_gen[1]}/{by_gen[2]}, "
                f"{sum(1 for g in inside if not g[3])} off the main thread), pause median "
                f"{statistics.median(pauses) if pauses else 0:.2f} ms, largest "
                f"{max(pauses, default=0):.2f} ms; overlapping {100 * slow_hit / max(n_slow, 1):.1f} "
                f"% of slow calls, {100 * hit / max(n_calls, 1):.1f} % of all"
            )


@dataclass
class Target:
    """One server under test and what was measured on it."""

    name: str
    server: Process
    model_dir: Path
    idle: list[float] = field(default_factory=list)
    """p99 (us) of each round without swaps."""
    swapping: list[float] = field(default_factory=list)
    """p99 (us) of each round with swaps."""
    swap_seconds: list[float] = field(default_factory=list)
    cpu_idle: float = 0.0
    """Server CPU seconds during the rounds without swaps."""
    cpu_swapping: float = 0.0
    """Server CPU seconds during the rounds with swaps."""
    cpu_children: float = 0.0
    """Parity children's CPU seconds during the rounds with swaps."""
    calls_idle: int = 0
    calls_swapping: int = 0
    swaps: int = 0
    lags_before: int = 0
    steps_before: int = 0
    gc_probe: Path | None = None
    idle_windows: list[tuple[float, float]] = field(default_factory=list)
    swap_windows: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) on perf_counter of each round's load."""
    swap_samples: list[list[tuple[float, float]]] = field(default_factory=list)
    """Each swap round's Predicts: (start, latency)."""
    idle_samples: list[list[tuple[float, float]]] = field(default_factory=list)
    loop_idle: list[float] = field(default_factory=lambda: [0.0] * 6)
    """The event-loop thread's :func:`_thread_counts` summed over the rounds without swaps."""
    loop_swapping: list[float] = field(default_factory=lambda: [0.0] * 6)
    process_idle: list[float] = field(default_factory=lambda: [0.0] * 3)
    """The process's :func:`_process_counts` summed over the rounds without swaps."""
    process_swapping: list[float] = field(default_factory=lambda: [0.0] * 3)
    tlb_idle: int = 0
    """TLB shootdowns (machine-wide) during the rounds without swaps."""
    tlb_swapping: int = 0
    swaps_in_windows: int = 0
    """Swaps finished while the load of a swap round ran (the server's log)."""
    client_idle: list[float] = field(default_factory=lambda: [0.0] * 3)
    """This (measuring) process's :func:`_usage` over the rounds without swaps."""
    client_swapping: list[float] = field(default_factory=lambda: [0.0] * 3)


def _start(
    name: str, root: Path, source: Path, python: str, extra: dict[str, str] | None = None
) -> tuple[Target, np.ndarray]:
    model_dir, rows = build_model(root / "models")
    gc_probe = root / "gc.jsonl"
    path = os.pathsep.join(p for p in (str(GC_PROBE), os.environ.get("PYTHONPATH", "")) if p)
    server = start_xylen(
        root / "models",
        {
            "FEEDBACK_DATA_DIR": str(root / "data"),
            "RETRAIN_AUTO": "false",
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "LOG_LEVEL": "INFO",  # the swap's log line carries the loop's lateness
            "PYTHONPATH": path,  # bench/gcprobe/sitecustomize.py records every collection
            "XYLEN_GC_PROBE": str(gc_probe),
            **(extra or {}),
        },
        source=source,
        python=python,
    )
    return Target(name, server, model_dir, gc_probe=gc_probe), rows


def _rollbacks(
    address: str,
    version: int,
    every: float,
    ready: Callable[[], object],
    stopped: Callable[[], bool],
) -> tuple[list[float], int]:
    """RollbackModel between the two versions, back to back (or one every ``every`` s), until
    ``stopped()``; returns each swap's seconds and the version the next one goes to."""
    durations: list[float] = []
    with grpc.insecure_channel(address) as plain:
        grpc.channel_ready_future(plain).result(timeout=60)
        admin = pb_grpc.ModelServiceStub(with_token(plain, ADMIN_TOKEN))
        ready()
        while not stopped():
            started = time.perf_counter()
            admin.RollbackModel(pb.RollbackModelRequest(version=version), timeout=300)
            took = time.perf_counter() - started
            durations.append(took)
            version = 3 - version
            if every > took:  # paced: the next swap starts `every` s after this one did
                time.sleep(every - took)
    return durations, version


def _driver_main(
    address: str, version: int, every: float, ready: Any, stop: Any, out: Connection
) -> None:
    """The swap driver's process: :func:`_rollbacks`, the result sent back on ``out``."""
    out.send(_rollbacks(address, version, every, ready.set, stop.is_set))


class ProcessDriver:
    """Swaps driven from a process of their own (spawned, so no gRPC state is forked): the
    measuring client's process holds nothing but its load. A thread blocked in a synchronous
    gRPC call inside the client (:class:`_ThreadDriver`, the old harness) made the client's own
    voluntary context switches per call more than double and its CPU per call rise 20-40 us
    while swaps ran, on a 2-core machine the server shares: part of the "p99 during swaps" was
    the client's."""

    def __init__(self, address: str, target_v: list[int], every: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._ready, self._stop = context.Event(), context.Event()
        self._results, child = context.Pipe(duplex=False)
        self._target_v = target_v
        self._process = context.Process(
            target=_driver_main,
            args=(address, target_v[0], every, self._ready, self._stop, child),
            name="bench-swap-driver",
            daemon=True,
        )

    def start(self) -> None:
        self._process.start()
        if not self._ready.wait(120):
            raise RuntimeError("the swap driver process did not connect within 120 s")

    def stop(self) -> list[float]:
        self._stop.set()
        durations, self._target_v[0] = self._results.recv()
        self._process.join(60)
        return list(durations)


class _ThreadDriver:
    """Swaps driven from a thread of the measuring process (``--swaps-in-client``)."""

    def __init__(self, address: str, target_v: list[int], every: float) -> None:
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self._out: list[tuple[list[float], int]] = []
        self._target_v = target_v
        self._thread = threading.Thread(
            target=lambda: self._out.append(
                _rollbacks(address, target_v[0], every, self._ready.set, self._stopped.is_set)
            )
        )

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(120)

    def stop(self) -> list[float]:
        self._stopped.set()
        self._thread.join()
        durations, self._target_v[0] = self._out[0]
        return durations


def _usage(usage: resource.struct_rusage) -> list[float]:
    """user + system CPU seconds, voluntary and involuntary context switches."""
    return [usage.ru_utime + usage.ru_stime, usage.ru_nvcsw, usage.ru_nivcsw]


def _add(total: list[float], before: list[float], after: list[float]) -> None:
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        total[i] += b - a


def _round(
    target: Target,
    request: pb.PredictRequest,
    in_flight: int,
    seconds: float,
    target_v: list[int],
    every: float = 0.0,
    in_thread: bool = False,
) -> None:
    address = f"127.0.0.1:{target.server.port}"
    pid = target.server.proc.pid
    own0, _ = _cpu(pid)
    counts0, process0, tlb0 = _thread_counts(pid, pid), _process_counts(pid), tlb_shootdowns()
    client0 = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    samples = asyncio.run(_load(address, request, in_flight, seconds))
    target.idle_windows.append((began, time.perf_counter()))
    counts1, process1, tlb1 = _thread_counts(pid, pid), _process_counts(pid), tlb_shootdowns()
    _add(target.client_idle, _usage(client0), _usage(resource.getrusage(resource.RUSAGE_SELF)))
    own1, children1 = _cpu(pid)
    _add(target.loop_idle, counts0, counts1)
    _add(target.process_idle, process0, process1)
    target.tlb_idle += tlb1 - tlb0
    target.idle.append(_p(samples, 0.99))
    target.idle_samples.append(samples)
    target.cpu_idle += own1 - own0
    target.calls_idle += len(samples)
    driver = (
        _ThreadDriver(address, target_v, every)
        if in_thread
        else ProcessDriver(address, target_v, every)
    )
    driver.start()
    time.sleep(0.2)
    counts1, process1, tlb1 = _thread_counts(pid, pid), _process_counts(pid), tlb_shootdowns()
    swaps1, client1 = len(_loop_lags(target.server)), resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    samples = asyncio.run(_load(address, request, in_flight, seconds))
    target.swap_windows.append((began, time.perf_counter()))
    counts2, process2, tlb2 = _thread_counts(pid, pid), _process_counts(pid), tlb_shootdowns()
    swaps2, client2 = len(_loop_lags(target.server)), resource.getrusage(resource.RUSAGE_SELF)
    target.swaps_in_windows += swaps2 - swaps1
    _add(target.loop_swapping, counts1, counts2)
    _add(target.process_swapping, process1, process2)
    _add(target.client_swapping, _usage(client1), _usage(client2))
    target.tlb_swapping += tlb2 - tlb1
    durations = driver.stop()
    target.swap_seconds.extend(durations)
    own2, children2 = _cpu(pid)
    target.swapping.append(_p(samples, 0.99))
    target.swap_samples.append(samples)
    target.cpu_swapping += own2 - own1
    target.cpu_children += children2 - children1
    target.calls_swapping += len(samples)
    target.swaps += len(durations)


def _split(target: Target) -> None:
    """Per Predict without / during swaps: the event-loop thread's own costs (where the
    Predicts run), the other threads' (the swap's own among them), and TLB shootdowns."""
    idle_n, swap_n = max(target.calls_idle, 1), max(target.calls_swapping, 1)
    loop_i = [v / idle_n for v in target.loop_idle]
    loop_s = [v / swap_n for v in target.loop_swapping]
    rest_i = [
        (p - m) / idle_n for p, m in zip(target.process_idle, target.loop_idle[:3], strict=True)
    ]
    rest_s = [
        (p - m) / swap_n
        for p, m in zip(target.process_swapping, target.loop_swapping[:3], strict=True)
    ]
    print(
        "  per Predict without / during swaps, the event loop's thread: user "
        f"{loop_i[0] * 1e6:.0f} / {loop_s[0] * 1e6:.0f} us, system {loop_i[1] * 1e6:.0f} / "
        f"{loop_s[1] * 1e6:.0f} us, minor faults {loop_i[2]:.3f} / {loop_s[2]:.3f}, waits "
        f"(voluntary switches: sockets or the GIL) {loop_i[3]:.3f} / {loop_s[3]:.3f}, "
        f"preempted {loop_i[4]:.3f} / {loop_s[4]:.3f}, runnable without a core "
        f"{loop_i[5] * 1e6:.0f} / {loop_s[5] * 1e6:.0f} us"
    )
    swaps = max(target.swaps_in_windows, 1)
    extra_waits = (loop_s[3] - loop_i[3]) * target.calls_swapping / swaps
    print(
        f"    the loop's extra waits per swap: {extra_waits:.0f}; all other threads (the swap's "
        f"own, exited ones too): user {rest_i[0] * 1e6:.0f} / {rest_s[0] * 1e6:.0f} us, system "
        f"{rest_i[1] * 1e6:.0f} / {rest_s[1] * 1e6:.0f} us, minor faults {rest_i[2]:.2f} / "
        f"{rest_s[2]:.2f}"
    )
    client_i = [v / idle_n for v in target.client_idle]
    client_s = [v / swap_n for v in target.client_swapping]
    print(
        f"    the measuring client's own process: CPU {client_i[0] * 1e6:.0f} / "
        f"{client_s[0] * 1e6:.0f} us, voluntary switches {client_i[1]:.2f} / {client_s[1]:.2f}, "
        f"involuntary {client_i[2]:.2f} / {client_s[2]:.2f}"
    )
    seconds_i = sum(b - a for a, b in target.idle_windows) or 1.0
    seconds_s = sum(b - a for a, b in target.swap_windows) or 1.0
    tlb_i, tlb_s = target.tlb_idle / seconds_i, target.tlb_swapping / seconds_s
    print(
        f"    TLB shootdowns (machine-wide) {tlb_i:.0f} / {tlb_s:.0f} a second; per swap beyond "
        f"the rounds without: {(tlb_s - tlb_i) * seconds_s / swaps:.1f} "
        f"({target.swaps_in_windows} swaps in the measured windows)"
    )


def _report(
    target: Target, in_flight: int, rounds: int, seconds: float, every: float = 0.0
) -> dict[str, float]:
    idle_p99, swap_p99 = statistics.median(target.idle), statistics.median(target.swapping)
    lags = _loop_lags(target.server)[target.lags_before :]
    swaps = max(target.swaps, 1)
    print(f"  [{target.name}]")
    print(
        f"  Predict batch 1, {in_flight} in flight, {rounds} rounds of {seconds:.0f}s each way; "
        f"{target.swaps} swaps {f'one every {every:g} s' if every else 'back to back'}, "
        f"{statistics.median(target.swap_seconds or [0]):.2f} s each (median)"
    )
    print(
        f"  p99 without swaps (median of rounds): {idle_p99:8.0f} us   "
        f"rounds {[round(v) for v in target.idle]}"
    )
    print(
        f"  p99 during swaps  (median of rounds): {swap_p99:8.0f} us   "
        f"rounds {[round(v) for v in target.swapping]}"
    )
    print(f"  swap p99 / idle p99: {swap_p99 / idle_p99:.2f}x  (target <= 2x)")
    if lags:
        print(
            f"  event loop's worst lateness per swap (server's 5 ms probe): median "
            f"{statistics.median(lags):.1f} ms, largest {max(lags):.1f} ms over {len(lags)} swaps"
        )
        print(f"    each swap's, sorted (ms): {sorted(round(v, 1) for v in lags)}")
        steps = _step_lags(target.server)[target.steps_before :]
        if steps:
            print("  per step of a swap (time; the loop's worst lateness while it ran):")
            _print_steps(steps)
    else:
        print("  event loop's worst lateness per swap: n/a (this server does not report it)")
    fd = target.server.log.fileno()
    loads = _LOAD.findall(os.pread(fd, os.fstat(fd).st_size, 0))[target.lags_before :]
    if loads:
        cpu, took, slept = ([float(load[i]) for load in loads] for i in (0, 1, 3))
        print(
            f"  the swap's own threads (server's count, MODEL_LOAD_CPU_SHARE "
            f"{loads[-1][2].decode()}): CPU median {statistics.median(cpu):.0f} ms in "
            f"{statistics.median(took):.0f} ms, slept {statistics.median(slept):.0f} ms"
        )
    per_call_idle = target.cpu_idle / max(target.calls_idle, 1) * 1e6
    per_call_swap = target.cpu_swapping / max(target.calls_swapping, 1) * 1e6
    # The server's CPU during swap rounds beyond what its Predicts cost without swaps.
    own_per_swap = (target.cpu_swapping - target.calls_swapping * per_call_idle / 1e6) / swaps
    # The loop thread's user + system CPU, and the whole process's system CPU and minor faults,
    # from the same /proc readings as the split below.
    calls_idle, calls_swap = max(target.calls_idle, 1), max(target.calls_swapping, 1)
    loop_idle, loop_swap = target.loop_idle, target.loop_swapping
    process_idle, process_swap = target.process_idle, target.process_swapping
    print(
        f"  server main thread (event loop) CPU per Predict: "
        f"{(loop_idle[0] + loop_idle[1]) / calls_idle * 1e6:.0f} us without swaps, "
        f"{(loop_swap[0] + loop_swap[1]) / calls_swap * 1e6:.0f} us during swaps"
    )
    print(
        f"  server system CPU per Predict: {process_idle[1] / calls_idle * 1e6:.0f} us "
        f"without swaps, {process_swap[1] / calls_swap * 1e6:.0f} us during swaps; "
        f"minor page faults per Predict {process_idle[2] / calls_idle:.2f} / "
        f"{process_swap[2] / calls_swap:.2f}"
    )
    _split(target)
    _attribute(target)
    print(
        f"  server CPU per Predict: {per_call_idle:.0f} us without swaps, {per_call_swap:.0f} us "
        f"during swaps; per swap: the server's own {own_per_swap * 1e3:.0f} ms beyond its "
        f"Predicts, parity children {target.cpu_children / swaps:.2f} CPU s; "
        f"{target.swaps / (rounds * seconds):.2f} swaps a second"
    )
    return {
        "idle_p99_us": idle_p99,
        "swap_p99_us": swap_p99,
        "ratio": swap_p99 / idle_p99,
        "loop_lag_ms_max": max(lags) if lags else float("nan"),
        "child_cpu_s_per_swap": target.cpu_children / swaps,
        "server_cpu_s_per_swap": own_per_swap,
    }


@contextlib.contextmanager
def _gap_watch() -> Iterator[list[float]]:
    """While the block runs, a thread sleeping 0.1 ms at a time records in the yielded list the
    longest gap (s) between its wake-ups: how long the GIL was out of its reach (plus the
    machine's noise). Read it after the block."""
    longest, stop = [0.0], threading.Event()

    def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.0001)
            now = time.perf_counter()
            longest[0] = max(longest[0], now - last)
            last = now

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.005)
    try:
        yield longest
    finally:
        stop.set()
        thread.join()


def _longest_gap_ms(work: Callable[[], object]) -> float:
    """The longest gap (ms) :func:`_gap_watch` sees while ``work`` runs on another thread."""
    with _gap_watch() as longest:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        time.sleep(0.005)
    return longest[0] * 1e3


def inversion(model_dir: Path, builds: int = 15) -> dict[str, float]:
    """The session build on a thread at niceness 10 (``MODEL_LOAD_THREAD_NICE=10``, what the
    server did before) against 0 (the default now), with a nice-0 busy process on the same core:
    the longest stall of a thread waiting for the GIL meanwhile (median over builds). The
    build holds the GIL while it parses the model; a niced holder is the one the scheduler
    preempts, so the waiting thread (the server's event loop) waits longer. This process and
    the busy one are pinned to one CPU for the measurement (Linux only; a few seconds)."""
    if not sys.platform.startswith("linux"):
        return {}
    from xylen_server.serving.session_pool import SessionPool

    onnx_bytes = (model_dir / "model.onnx").read_bytes()
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    hog = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass",
        ]
    )
    out: dict[str, float] = {}
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.3)

        def build(nice: int) -> None:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
            SessionPool(onnx_bytes, 2, 1).close()

        gaps: dict[int, list[float]] = {10: [], 0: []}
        for _ in range(builds):
            for nice in (10, 0):
                gaps[nice].append(_longest_gap_ms(lambda nice=nice: build(nice)))  # type: ignore[misc]
        for nice, seen in gaps.items():
            out[f"nice {nice}"] = statistics.median(seen)
            print(
                f"  session build on a thread at nice {nice:2d}, a nice-0 busy process on its "
                f"core: longest GIL wait median {statistics.median(seen):5.1f} ms, largest "
                f"{max(seen):5.1f} ms ({builds} builds)"
            )
    finally:
        hog.kill()
        hog.wait()
        os.sched_setaffinity(0, before)
    return out


def construction(model_dir: Path, builds: int = 20) -> dict[str, tuple[float, float]]:
    """CPU per build and the longest GIL hold of building the model's ONNX Runtime session,
    as served (``session_options``) and with the alternatives: optimizations off, and the ORT
    format saved pre-optimized (what a child could hand the server). The GIL hold is the
    longest gap a thread sleeping 0.1 ms sees while a build runs (median over builds), beside
    the same thread's longest gap with no build (the machine's noise)."""
    import onnxruntime as ort

    from xylen_server.serving.session_pool import session_options

    onnx_bytes = (model_dir / "model.onnx").read_bytes()
    ort_path = model_dir.parent / "model.ort"
    saving = session_options(1)
    saving.add_session_config_entry("session.save_model_format", "ORT")
    saving.optimized_model_filepath = str(ort_path)
    ort.InferenceSession(onnx_bytes, saving, providers=["CPUExecutionProvider"])
    ort_bytes = ort_path.read_bytes()

    def options(level: ort.GraphOptimizationLevel, ort_format: bool = False) -> object:
        chosen = session_options(1)
        chosen.graph_optimization_level = level
        if ort_format:
            chosen.add_session_config_entry("session.load_model_format", "ORT")
        return chosen

    level = ort.GraphOptimizationLevel
    variants: dict[str, tuple[bytes, object] | None] = {
        "no build (noise)": None,
        "as served (ORT_ENABLE_ALL)": (onnx_bytes, session_options(1)),
        "optimizations off": (onnx_bytes, options(level.ORT_DISABLE_ALL)),
        "ORT format, pre-optimized, off": (ort_bytes, options(level.ORT_DISABLE_ALL, True)),
    }
    out: dict[str, tuple[float, float]] = {}
    for name, variant in variants.items():
        holds, cpu = [], 0.0
        for _ in range(builds):
            with _gap_watch() as longest:
                started = time.thread_time()
                if variant is None:
                    time.sleep(0.015)
                else:
                    ort.InferenceSession(variant[0], variant[1], providers=["CPUExecutionProvider"])
                cpu += time.thread_time() - started
                time.sleep(0.002)
            holds.append(longest[0])
        out[name] = (cpu / builds * 1e3, statistics.median(holds) * 1e3)
        print(
            f"  session build {name:32s} CPU {out[name][0]:5.1f} ms, longest GIL hold "
            f"{out[name][1]:4.1f} ms (median of {builds}; max {max(holds) * 1e3:.1f})"
        )
    return out


def _python_of(source: Path) -> str:
    venv = source / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def run(
    source: Path,
    seconds: float,
    rounds: int,
    in_flight: int,
    baseline: Path | None = None,
    every: float = 0.0,
    this_env: dict[str, str] | None = None,
    baseline_env: dict[str, str] | None = None,
    swaps_in_client: bool = False,
    baseline_swaps_in_client: bool = False,
) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="xylen-bench-swaps-") as tmp:
        root = Path(tmp)
        wanted = [("this", source, sys.executable, this_env or {}, swaps_in_client)]
        if baseline is not None:
            wanted.insert(
                0,
                (
                    "baseline",
                    baseline,
                    _python_of(baseline),
                    baseline_env or {},
                    baseline_swaps_in_client,
                ),
            )
        targets: list[Target] = []
        in_client: dict[str, bool] = {}
        try:
            for name, tree, python, extra, thread_driver in wanted:
                label = f"{name}: {tree}" + ("" if python == sys.executable else f" ({python})")
                label += "".join(f" {k}={v}" for k, v in extra.items())
                label += " (swaps from a thread of the client)" if thread_driver else ""
                target, rows = _start(label, root / name, tree, python, extra)
                targets.append(target)
                in_client[target.name] = thread_driver
            request = pb.PredictRequest(
                inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[7].tolist()))]
            )
            print(
                f"  -- building the {targets[-1].model_dir.name} session (500 trees), in this process"
            )
            construction(targets[-1].model_dir)
            inversion(targets[-1].model_dir)
            versions: dict[str, list[int]] = {}
            for target in targets:
                with grpc.insecure_channel(f"127.0.0.1:{target.server.port}") as plain:
                    admin = pb_grpc.ModelServiceStub(with_token(plain, ADMIN_TOKEN))
                    _second_version(target.model_dir)
                    admin.ReloadModel(pb.ReloadModelRequest(), timeout=300)
                target.lags_before = len(_loop_lags(target.server))
                target.steps_before = len(_step_lags(target.server))
                versions[target.name] = [1]
            for _ in range(rounds):
                for target in targets:
                    _round(
                        target,
                        request,
                        in_flight,
                        seconds,
                        versions[target.name],
                        every,
                        in_client[target.name],
                    )
        finally:
            for target in targets:
                target.server.stop()
        return {t.name: _report(t, in_flight, rounds, seconds, every) for t in targets}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_swaps")
    parser.add_argument("--seconds", type=float, default=6.0, help="per round, each way")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--source", type=Path, default=REPO, help="checkout whose server runs")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="another checkout, measured in the same run"
    )
    parser.add_argument(
        "--swap-every",
        type=float,
        default=0.0,
        help="start a swap every this many seconds (0: back to back, the next as soon as one "
        "ends); a fixed pace compares servers whose swaps take different times at one rate",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of this server (repeatable), e.g. MODEL_LOAD_CPU_SHARE=1",
    )
    parser.add_argument(
        "--baseline-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the baseline's server (repeatable); with --baseline . the same tree "
        "compares two settings side by side",
    )
    parser.add_argument(
        "--swaps-in-client",
        action="store_true",
        help="drive the swaps from a thread of the measuring process (the harness before "
        "2026-12-07), not from a process of their own",
    )
    parser.add_argument(
        "--baseline-swaps-in-client",
        action="store_true",
        help="the same for the baseline's rounds only: with --baseline . the two harnesses "
        "side by side",
    )
    args = parser.parse_args(argv)
    pace = f"one every {args.swap_every:g} s" if args.swap_every else "back to back"
    print(f"== hot swaps under load, {pace} (server from {args.source}) ==")
    run(
        args.source,
        args.seconds,
        args.rounds,
        args.in_flight,
        args.baseline,
        args.swap_every,
        dict(pair.split("=", 1) for pair in args.env),
        dict(pair.split("=", 1) for pair in args.baseline_env),
        args.swaps_in_client,
        args.baseline_swaps_in_client,
    )


if __name__ == "__main__":
    main()
