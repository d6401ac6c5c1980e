"""Model-server benchmark, everything measured side by side in one run on the same model:

* in process: LightGBM ``Booster.predict``, LightGBM's single-row fast API and an ONNX Runtime
  session, at batch 1 and 1024;
* over gRPC on loopback: a bare grpc.aio echo of the same request bytes (the floor), then
  xylen Predict (unary) and PredictStream at batch 1, at 1, 8, 32 and 64 calls in flight, in
  alternating short slices: p50/p99, requests/s, and the server's CPU per call (the server
  process's user + system CPU time over its slices / the calls answered, every thread counted)
  with calls per core-second, each against the echo's at the same concurrency. CPU per call
  does not depend on how busy the machine is the way latency does. The same two targets again
  on a server of all the workers this host gives it (``WORKERS=auto``, when more than one),
  reached over 8 connections, its CPU counted over the supervisor and every worker;
* what a lone unary Predict's p50 is made of (:func:`without_the_engine`): at one call in
  flight, the echo, a generated stub answering a canned response (``bench.canned_server``),
  xylen on the 500-tree model, on a 1-tree model, and with the loop's inference replaced by a
  constant (``bench/constant_engine``), so the share of protobuf and the generated handler, of
  xylen's own work, of onnxruntime's call and of its tree walk is measured, not guessed; then
  the same again pinned, the client on one CPU and every server on another, as when callers
  run on other hosts (:func:`without_the_engine`'s ``pinned``).

Every xylen server starts through :func:`start_server` (one environment in, a SERVING process
out), so a variant is one more environment. The model is what production serves: LightGBM, 500
trees x 31 leaves, on the 25 shared features of generated 1h candles. ``python -m
bench.bench_server [--seconds S] [--source TREE] [--skip-in-process]``: about a minute and a
half on a quiet 2-core machine (model 3 s, in-process 30 s, over gRPC 45 s, the lone Predict's
parts 30 s); ``--source`` measures another checkout's ``xylen_server`` (e.g. main, for a
before/after).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from training import features
from training.generator import simulate
from training.metadata import ModelMetadata, sha256_file
from training.onnx_export import export_onnx
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2

REPO = Path(__file__).resolve().parents[1]
HOUR_MS = 3_600_000


def _candles(n: int = 20_000) -> dict[str, np.ndarray]:
    start = 1_704_067_200_000  # 2024-01-01
    frame = simulate(np.arange(start, start + n * HOUR_MS, HOUR_MS, dtype=np.int64), HOUR_MS, 3)
    return features.candles_from_frame(frame)


def build_model(root: Path, trees: int = 500) -> tuple[Path, np.ndarray]:
    """A production-sized LightGBM model directory, and feature rows to send it."""
    import lightgbm as lgb

    candles = _candles()
    x = features.compute_features(candles)
    y = np.r_[(candles["close"][1:] > candles["close"][:-1]).astype(np.int64), 0]
    keep = np.isfinite(x).all(axis=1)
    x, y = x[keep].astype(np.float32), y[keep]
    params = {"objective": "binary", "verbose": -1, "num_leaves": 31, "seed": 1, "num_threads": 2}
    booster = lgb.train(params, lgb.Dataset(x, y), trees)
    model_dir = root / "model_1"
    model_dir.mkdir(parents=True)
    booster.save_model(str(model_dir / "lightgbm_model.txt"))
    ModelMetadata(
        name="model_1",
        model_type="lightgbm",
        version=1,
        training_samples=len(y),
        trained_at="2026-01-01T00:00:00Z",
        feature_names=list(features.FEATURE_NAMES),
        lookback=features.LOOKBACK_PERIODS,
        features_hash=features.feature_definitions_hash(),
        checksums={"lightgbm_model.txt": sha256_file(model_dir / "lightgbm_model.txt")},
    ).write(model_dir)
    export_onnx(model_dir)
    return model_dir, x


def _per_call_us(fn: Callable[[], object], seconds: float) -> tuple[float, float]:
    """(p50, p99) microseconds of ``fn`` called back to back for about ``seconds``."""
    for _ in range(50):
        fn()
    samples = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def in_process(model_dir: Path, rows: np.ndarray, seconds: float) -> None:
    import lightgbm as lgb
    import onnxruntime as ort

    from xylen_server.serving.native import NativeModel
    from xylen_server.serving.session_pool import session_options

    meta = ModelMetadata.read(model_dir)
    booster = lgb.Booster(model_file=str(model_dir / "lightgbm_model.txt"))
    native = NativeModel(meta, model_dir, workers=1)
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), session_options(1), providers=["CPUExecutionProvider"]
    )
    print("\n== in process, same model (500 trees x 31 leaves), p50 / p99 per call ==")
    results = {}
    for batch in (1, 1024):
        x = np.ascontiguousarray(rows[:batch])
        cases = {
            "LightGBM Booster.predict": lambda x=x: booster.predict(x, num_threads=1),
            "LightGBM fast single-row API": lambda x=x: native.predict_proba(x),
            "ONNX Runtime session (1 thread)": lambda x=x: session.run(
                ["probabilities"], {"input": x}
            ),
        }
        if batch > 16:
            del cases[
                "LightGBM fast single-row API"
            ]  # NativeModel uses Booster.predict above 16 rows
        for name, fn in cases.items():
            p50, p99 = _per_call_us(fn, seconds)
            results[(name, batch)] = p50
            print(f"  batch {batch:>4}  {name:<34} p50 {p50:9.1f} us   p99 {p99:9.1f} us")
    for batch in (1, 1024):
        ratio = (
            results[("LightGBM Booster.predict", batch)]
            / results[("ONNX Runtime session (1 thread)", batch)]
        )
        print(f"  batch {batch:>4}  ONNX speed-up over Booster.predict: {ratio:.2f}x")
    window = {
        name: np.ascontiguousarray(v[-features.LOOKBACK_PERIODS :])
        for name, v in _candles(300).items()
    }
    p50, p99 = _per_call_us(lambda: features.window_features(window), seconds)
    print(
        f"  features of one {features.LOOKBACK_PERIODS}-candle window (the candle path's extra work): "
        f"p50 {p50:.1f} us   p99 {p99:.1f} us"
    )
    fast = results[("LightGBM fast single-row API", 1)]
    print(
        f"  batch    1  fast single-row API speed-up over Booster.predict: "
        f"{results[('LightGBM Booster.predict', 1)] / fast:.2f}x"
    )
    native.close()


class Process:
    def __init__(
        self, command: list[str], env: dict[str, str], marker: str, cwd: Path = REPO
    ) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=cwd
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if marker not in line:
            self.proc.wait(30)
            self.log.seek(0)
            raise RuntimeError(f"{command} did not start: {line}{self.log.read()}")
        self.port = int(line.rsplit(" ", 1)[1])

    @property
    def cpu_seconds(self) -> float:
        """User + system CPU time the process (all its threads) has used so far."""
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (every thread), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def xylen_env(model_root: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a bench xylen server serving ``model_root/model_1`` (``extra`` may
    override any of it)."""
    return dict(
        os.environ,
        MODEL_PATH=str(model_root),
        MODEL_NAME="model_1",
        GRPC_HOST="127.0.0.1",
        GRPC_PORT="0",
        METRICS_PORT="0",
        LOG_LEVEL="WARNING",
    ) | dict(extra or {})


def start_server(
    env: Mapping[str, str], source: Path = REPO, python: str | Sequence[str] = sys.executable
) -> Process:
    """A xylen server process started with exactly ``env``, once it reports SERVING;
    ``source`` is the tree whose ``xylen_server`` it runs (with the interpreter ``python``, or
    the command that runs it, e.g. under ``taskset``). Every server the bench measures starts
    here (so a variant, e.g. with ``WORKERS=N``, is one more ``env``)."""
    command = [python] if isinstance(python, str) else list(python)
    server = Process([*command, "-m", "xylen_server"], dict(env), "listening on port", source)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return server
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    server.stop()
    raise RuntimeError("xylen server did not become SERVING")


def start_xylen(
    model_root: Path,
    extra: dict[str, str] | None = None,
    source: Path = REPO,
    python: str = sys.executable,
) -> Process:
    """A xylen server process; ``source`` is the tree whose ``xylen_server`` it runs."""
    return start_server(xylen_env(model_root, extra), source, python)


def _interleaved_latency(
    calls: dict[str, Callable[[], object]], seconds: float
) -> dict[str, tuple[float, float]]:
    """(p50, p99) us per target, calling the targets in turn so machine noise hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(100):
            call()
    stop = time.perf_counter() + seconds * len(calls)
    while time.perf_counter() < stop:
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - started)
    out = {}
    for name, values in samples.items():
        values.sort()
        out[name] = (values[len(values) // 2] * 1e6, values[int(len(values) * 0.99)] * 1e6)
    return out


async def _unary_slice(
    call: Callable[[], object],
    concurrency: int,
    seconds: float,
    latencies: list[float] | None = None,
    errors: Counter[str] | None = None,
) -> int:
    """Calls answered by ``concurrency`` callers in a loop for ``seconds``; each call's
    latency goes to ``latencies`` when given, and each failed call's status to ``errors``
    (without ``errors`` a failure ends the run)."""
    done = 0
    stop = time.perf_counter() + seconds
    clock = time.perf_counter

    async def worker() -> None:
        nonlocal done
        while (started := clock()) < stop:
            try:
                await call()  # type: ignore[misc]
            except grpc.RpcError as exc:
                if errors is None:
                    raise
                errors[exc.code().name] += 1  # type: ignore[attr-defined]
                continue
            if latencies is not None:
                latencies.append(clock() - started)
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def _stream_slice(
    stub: pb_grpc.ModelServiceStub,
    request: pb.PredictRequest,
    concurrency: int,
    seconds: float,
    latencies: list[float] | None = None,
) -> int:
    """``concurrency`` items kept in flight on one PredictStream for ``seconds``."""
    call = stub.PredictStream()
    done = sent = 0
    clock = time.perf_counter
    stop = clock() + seconds
    sent_at: dict[str, float] = {}

    async def send() -> None:
        nonlocal sent
        key = str(sent)
        sent_at[key] = clock()
        await call.write(pb.PredictStreamRequest(request_id=key, request=request))
        sent += 1

    for _ in range(concurrency):
        await send()
    while done < sent:
        answer = await call.read()
        assert answer.status.code == 0, answer.status
        if latencies is not None:
            latencies.append(clock() - sent_at.pop(answer.request_id))
        done += 1
        if clock() < stop:
            await send()
    await call.done_writing()
    return done


async def _streams_slice(
    stubs: Sequence[pb_grpc.ModelServiceStub],
    request: pb.PredictRequest,
    concurrency: int,
    seconds: float,
    latencies: list[float] | None = None,
) -> int:
    """``concurrency`` items in flight spread over one PredictStream per connection (as many
    streams as items at most): what reaches every worker of a WORKERS=N server."""
    streams = min(concurrency, len(stubs))
    shares = [concurrency // streams + (i < concurrency % streams) for i in range(streams)]
    done = await asyncio.gather(
        *(
            _stream_slice(stubs[i], request, share, seconds, latencies)
            for i, share in enumerate(shares)
        )
    )
    return sum(done)


async def _interleaved_throughput(
    slices: dict[str, Callable[[float], object]], seconds: float, slice_seconds: float = 0.25
) -> dict[str, float]:
    """Requests/s per target, running the targets in alternating short slices."""
    counts = dict.fromkeys(slices, 0)
    elapsed = dict.fromkeys(slices, 0.0)
    for _ in range(max(1, int(seconds / slice_seconds))):
        for name, run in slices.items():
            started = time.perf_counter()
            counts[name] += await run(slice_seconds)  # type: ignore[misc]
            elapsed[name] += time.perf_counter() - started
    return {name: counts[name] / elapsed[name] for name in slices}


@dataclass
class Load:
    """One target at one concurrency: calls, wall time, server CPU time, call latencies."""

    calls: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    """Failed calls by status code (not counted in ``calls``)."""

    @property
    def rps(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        """Server CPU (process CPU time, every thread) per call, microseconds."""
        return self.cpu / self.calls * 1e6 if self.calls else 0.0

    @property
    def per_core_second(self) -> float:
        """Calls per second of server CPU: what one core of this server answers."""
        return self.calls / self.cpu if self.cpu else 0.0

    def percentile(self, q: float) -> float:
        values = sorted(self.latencies)
        return values[min(len(values) - 1, int(len(values) * q))] * 1e6 if values else 0.0


@dataclass
class Target:
    """A load to put on one server process: ``run(concurrency, seconds, load) -> calls``,
    adding each call's latency and failure to ``load``."""

    label: str
    pid: int
    run: Callable[[int, float, Load], Awaitable[int]]
    pids: Sequence[int] = ()
    """Every process of the target when it has several (a supervisor and its workers)."""

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids or (self.pid,))


def unary_target(
    label: str, pid: int, call: Callable[[], object], pids: Sequence[int] = ()
) -> Target:
    """A :class:`Target` calling ``call`` (one unary call) at each concurrency."""
    return Target(
        label,
        pid,
        lambda c, s, load: _unary_slice(call, c, s, load.latencies, load.errors),
        pids,
    )


async def measure(
    targets: Sequence[Target],
    levels: Sequence[int],
    seconds: float,
    slice_seconds: float = 0.25,
) -> dict[tuple[str, int], Load]:
    """Every target at every concurrency level, in alternating short slices (so machine
    noise hits all alike), with each server's CPU time read around its own slices."""
    loads = {(t.label, level): Load() for t in targets for level in levels}
    for level in levels:
        for target in targets:  # warm-up: connections, the first calls' allocations
            await target.run(level, 0.1, Load())
        for _ in range(max(1, round(seconds / slice_seconds))):
            for target in targets:
                load = loads[(target.label, level)]
                cpu, started = target.cpu_seconds(), time.perf_counter()
                load.calls += await target.run(level, slice_seconds, load)
                load.seconds += time.perf_counter() - started
                load.cpu += target.cpu_seconds() - cpu
    return loads


LEVELS = (1, 8, 32, 64)


def report(
    loads: dict[tuple[str, int], Load], labels: Sequence[str], floor: str, levels: Sequence[int]
) -> None:
    """One line per target and concurrency: latency, throughput and server CPU per call, each
    against ``floor``'s at the same concurrency."""
    print(
        f"  {'target':<28}{'in flight':>9}{'p50 us':>9}{'p99 us':>9}{'p50/floor':>10}"
        f"{'req/s':>8}{'of floor':>9}{'CPU us/call':>12}{'/floor':>7}{'calls/core-s':>13}"
    )
    for level in levels:
        base = loads[(floor, level)]
        for label in labels:
            load = loads[(label, level)]
            p50 = load.percentile(0.5)
            print(
                f"  {label:<28}{level:>9}{p50:>9.0f}{load.percentile(0.99):>9.0f}"
                f"{p50 / base.percentile(0.5):>9.2f}x{load.rps:>8.0f}"
                f"{load.rps / base.rps:>9.0%}{load.cpu_us:>12.0f}"
                f"{load.cpu_us / base.cpu_us:>6.2f}x{load.per_core_second:>13.0f}"
                + (f"  errors: {dict(load.errors)}" if load.errors else "")
            )


def over_grpc(
    model_root: Path,
    rows: np.ndarray,
    seconds: float,
    source: Path = REPO,
    workers: int | None = None,
) -> dict[tuple[str, int], Load]:
    """The echo floor, then xylen Predict and PredictStream on one process and, when this host
    gives a server more than one core (``WORKERS=auto``; ``workers`` overrides), on a server of
    all its workers reached over :data:`CONNECTIONS` connections (the kernel hands each
    connection to one worker); CPU per call counts every process of a server."""
    from bench.bench_workers import CONNECTIONS, Server  # it imports this module
    from xylen_server.workers import worker_count

    request = pb.PredictRequest(
        inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[0].tolist()))]
    )
    payload = request.SerializeToString()
    count = worker_count("auto") if workers is None else workers
    echo = Process([sys.executable, "-m", "bench.echo_server"], dict(os.environ), "echo listening")
    xylen = start_server(xylen_env(model_root), source)
    data = Path(tempfile.mkdtemp(prefix="xylen-bench-workers-data-"))
    many = Server(model_root, count, data, source) if count > 1 else None
    try:
        print(
            f"\n== over gRPC on loopback (grpcio {grpc.__version__}), batch 1, "
            f"{len(payload)}-byte request, asyncio client, targets measured in turn "
            f"({seconds:.0f}s each per level); one server process"
            + (f", and WORKERS={count} over {CONNECTIONS} connections" if many else "")
            + f"; {os.cpu_count()} cores shared with the client =="
        )
        labels = ["bare grpc.aio echo (floor)", "xylen Predict (unary)", "xylen PredictStream"]
        if many is not None:
            labels += [f"Predict, {count} workers", f"PredictStream, {count} workers"]

        async def run() -> dict[tuple[str, int], Load]:
            own = [("grpc.use_local_subchannel_pool", 1)]
            channels = [
                grpc.aio.insecure_channel(f"127.0.0.1:{echo.port}"),
                grpc.aio.insecure_channel(f"127.0.0.1:{xylen.port}"),
            ]
            if many is not None:
                channels += [
                    grpc.aio.insecure_channel(many.address, options=own) for _ in range(CONNECTIONS)
                ]
            try:
                echo_call = channels[0].unary_unary("/bench.Echo/Echo")
                stub = pb_grpc.ModelServiceStub(channels[1])
                answer = await stub.Predict(request)
                assert len(answer.predictions) == 1
                targets = [
                    unary_target(labels[0], echo.proc.pid, lambda: echo_call(payload)),
                    unary_target(labels[1], xylen.proc.pid, lambda: stub.Predict(request)),
                    Target(
                        labels[2],
                        xylen.proc.pid,
                        lambda c, s, load: _stream_slice(stub, request, c, s, load.latencies),
                    ),
                ]
                if many is not None:
                    stubs = [pb_grpc.ModelServiceStub(c) for c in channels[2:]]
                    turn = itertools.cycle(stubs)
                    targets += [
                        unary_target(
                            labels[3],
                            many.process.proc.pid,
                            lambda: next(turn).Predict(request),
                            many.pids,
                        ),
                        Target(
                            labels[4],
                            many.process.proc.pid,
                            lambda c, s, load: _streams_slice(stubs, request, c, s, load.latencies),
                            many.pids,
                        ),
                    ]
                return await measure(targets, LEVELS, seconds)
            finally:
                for channel in channels:
                    await channel.close()

        loads = asyncio.run(run())
        report(loads, labels, labels[0], LEVELS)
        return loads
    finally:
        echo.stop()
        xylen.stop()
        if many is not None:
            many.stop()
        shutil.rmtree(data, ignore_errors=True)


CONSTANT_ENGINE = Path(__file__).resolve().parent / "constant_engine"
"""``sitecustomize`` that replaces the loop's inference by a constant (its docstring)."""


def host_cpu() -> str:
    """The processor and its caches, as the kernel reports them: the same code's ratios to the
    echo differ from one host to another (2026-12-07: CPU per call at 32 in flight 1.24x on one
    host, 1.62x on the next, same commit), so every run says which host it measured."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    caches = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        with contextlib.suppress(OSError):
            kind = (index / "type").read_text().strip()
            if kind != "Instruction":
                level = (index / "level").read_text().strip()
                size = (index / "size").read_text().strip()
                caches.append(f"L{level}{'d' if kind == 'Data' else ''} {size}")
    return model + (f" (caches: {', '.join(caches)})" if caches else "")


def pinned_cpus() -> tuple[int, int] | None:
    """(the client's CPU, the servers' CPU) for the pinned lone-Predict run: two CPUs this
    process may use and ``taskset`` to put the servers on one; None when there are not two or
    no ``taskset``."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return None
    return cpus[0], cpus[1]


def without_the_engine(
    model_root: Path,
    rows: np.ndarray,
    seconds: float,
    source: Path = REPO,
    pinned: tuple[int, int] | None = None,
) -> dict[tuple[str, int], Load]:
    """What a lone unary Predict's p50 is made of: the echo floor; a generated stub answering
    a canned response (``bench.canned_server``: protobuf parsing and a response of xylen's
    shape, nothing else); xylen serving the 500-tree model; the same server with a 1-tree model (onnxruntime's fixed cost per run, almost no
    tree walk); the same server with the loop's inference replaced by a constant
    (``bench/constant_engine``: every other step of a Predict as in production). At one call in
    flight, side by side in alternating slices.

    ``pinned`` (client CPU, server CPU) runs the same with this process (the client) on one CPU
    and every server on the other (``taskset``), the shape production has, where callers run on
    other hosts: one call in flight keeps four threads busy (each side's event loop and grpc
    poller), and on two shared cores whatever a server does after sending an answer (its log
    row, its metrics) may delay the client's reading of it. Pinned, the two sides never compete
    for a core, so the two runs side by side show what that sharing costs each target."""
    if pinned is not None:
        client_cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {pinned[0]})
        try:
            return _without_the_engine(
                model_root, rows, seconds, source, ["taskset", "-c", str(pinned[1])]
            )
        finally:
            os.sched_setaffinity(0, client_cpus)
    return _without_the_engine(model_root, rows, seconds, source, [])


def _without_the_engine(
    model_root: Path, rows: np.ndarray, seconds: float, source: Path, prefix: list[str]
) -> dict[tuple[str, int], Load]:
    request = pb.PredictRequest(
        inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[0].tolist()))]
    )
    payload = request.SerializeToString()
    one_tree = Path(tempfile.mkdtemp(prefix="xylen-bench-one-tree-"))
    build_model(one_tree, trees=1)
    path = os.pathsep.join(p for p in (str(CONSTANT_ENGINE), os.environ.get("PYTHONPATH", "")) if p)
    labels = [
        "bare grpc.aio echo (floor)",
        "generated stub, canned answer",
        "xylen, 500 trees",
        "xylen, 1 tree",
        "xylen, no engine call",
    ]
    python = [*prefix, sys.executable]
    echo = Process([*python, "-m", "bench.echo_server"], dict(os.environ), "echo listening")
    servers: list[Process] = []
    try:
        servers.append(Process([*python, "-m", "bench.canned_server"], dict(os.environ), "canned"))
        servers.append(start_server(xylen_env(model_root), source, python))
        servers.append(start_server(xylen_env(one_tree), source, python))
        servers.append(
            start_server(
                xylen_env(model_root, {"PYTHONPATH": path, "XYLEN_BENCH_CONSTANT_ENGINE": "0.5"}),
                source,
                python,
            )
        )
        where = (
            f"; this client on CPU {min(os.sched_getaffinity(0))}, every server on CPU {prefix[-1]}"
            if prefix
            else ""
        )
        print(
            "\n== a lone unary Predict: the echo floor, a generated stub's canned answer, xylen on "
            "the 500-tree model, on a 1-tree model, and with the loop's inference replaced by a "
            "constant (everything else as in production), 1 call in flight, in turn "
            f"({seconds:.0f}s each{where}) =="
        )

        async def run() -> dict[tuple[str, int], Load]:
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{echo.port}")] + [
                grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") for server in servers
            ]
            try:
                echo_call = channels[0].unary_unary("/bench.Echo/Echo")
                targets = [unary_target(labels[0], echo.proc.pid, lambda: echo_call(payload))]
                for label, server, channel in zip(labels[1:], servers, channels[1:], strict=True):
                    stub = pb_grpc.ModelServiceStub(channel)
                    assert len((await stub.Predict(request)).predictions) == 1
                    targets.append(
                        unary_target(
                            label, server.proc.pid, lambda stub=stub: stub.Predict(request)
                        )
                    )
                return await measure(targets, (1,), seconds)
            finally:
                for channel in channels:
                    await channel.close()

        loads = asyncio.run(run())
        report(loads, labels, labels[0], (1,))
        floor, canned, full, one, none = (loads[(label, 1)].percentile(0.5) for label in labels)
        print(
            f"  p50 over the echo's: {canned / floor:.2f}x for a generated stub's canned answer, "
            f"+{(none - canned) / floor:.2f}x for xylen's own work (no engine call: "
            f"{none / floor:.2f}x), +{(one - none) / floor:.2f}x for onnxruntime's call on 1 "
            f"tree, +{(full - one) / floor:.2f}x for the walk of 500 trees"
        )
        return loads
    finally:
        echo.stop()
        for server in servers:
            server.stop()
        shutil.rmtree(one_tree, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_server")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument(
        "--source", type=Path, default=REPO, help="the tree whose xylen_server to measure"
    )
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument(
        "--workers", type=int, default=None, help="workers of the all-workers server (auto)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xylen-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        model_dir, rows = build_model(root)
        print(
            f"model: 500 trees x 31 leaves, 25 features, built in {time.perf_counter() - started:.1f}s; "
            f"cores: {os.cpu_count()}; {host_cpu()}"
        )
        if not args.skip_in_process:
            in_process(model_dir, rows, args.seconds)
        over_grpc(root, rows, args.seconds, args.source, args.workers)
        without_the_engine(root, rows, 2 * args.seconds, args.source)
        cpus = pinned_cpus()
        if cpus is None:
            print("  (the pinned lone Predict needs two CPUs and taskset: skipped)")
        else:
            without_the_engine(root, rows, 2 * args.seconds, args.source, cpus)
        print("  (shared, noisy machine: compare the ratios, measured in turn, not the absolutes)")


if __name__ == "__main__":
    main()
