"""Python work per request, counted (``python -m bench calls``): how many Python function calls
and calls of C functions from Python a server's event-loop thread makes per answered call, for
the bare grpc.aio echo and xylen's unary Predict at 1 and 32 in flight, and which of xylen's
own functions those are (``bench/callcount``).

Timings on a shared machine move with the other tenants and with the host (README, "The same
code on another host"); these counts do not: a change to the per-call path shows here as
calls added or removed, whatever else the machine is doing. They weigh every call alike (an
onnxruntime run and a ``len`` are one C call each), so they complement ``python -m bench
server``'s CPU per call, not replace it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.bench_server import (
    REPO,
    Process,
    _unary_slice,
    build_model,
    start_server,
    xylen_env,
)
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2

CALL_COUNT = Path(__file__).resolve().parent / "callcount"
OWN = ("xylen_server", "training")
"""Packages whose functions are xylen's own."""


@dataclass
class Counted:
    """What a server's event-loop thread called while ``answered`` calls were answered."""

    answered: int
    counts: list[tuple[int, str, str, str]]
    """(count, ``py`` or ``c``, file or module, function), most called first."""

    def per_request(self, kind: str) -> float:
        return sum(n for n, k, _, _ in self.counts if k == kind) / self.answered

    def own(self, source: Path = REPO) -> list[tuple[float, str]]:
        """xylen's own Python functions (:data:`OWN`) and how often each ran per answered
        call (a coroutine counts once per resumption), most first."""
        rows = []
        for count, kind, where, name in self.counts:
            path = Path(where)
            if kind != "py" or not path.is_relative_to(source):
                continue
            relative = path.relative_to(source)
            if relative.parts[0] in OWN:
                rows.append((count / self.answered, f"{relative}:{name}"))
        return rows


def counting_env(env: dict[str, str], out: Path) -> dict[str, str]:
    """``env`` with the call counter on its ``PYTHONPATH``, writing to ``out``."""
    path = os.pathsep.join(p for p in (str(CALL_COUNT), env.get("PYTHONPATH", "")) if p)
    return env | {"PYTHONPATH": path, "XYLEN_BENCH_CALL_COUNT": str(out)}


async def count(
    pid: int,
    out: Path,
    call: Callable[[], Awaitable[object]],
    concurrency: int,
    seconds: float,
) -> Counted:
    """Count the calls of process ``pid`` (started with :func:`counting_env` and ``out``) while
    ``concurrency`` callers make ``call`` for ``seconds``, after a warm-up."""
    out.unlink(missing_ok=True)
    await _unary_slice(call, concurrency, 0.3)
    os.kill(pid, signal.SIGUSR1)
    await asyncio.sleep(0.1)  # the handler runs at the loop's next wake-up
    answered = await _unary_slice(call, concurrency, seconds)
    await asyncio.sleep(0.1)  # the answers' deferred work (log rows, metrics) counted too
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not out.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} wrote no call counts to {out}")
        await asyncio.sleep(0.02)
    counts = []
    for line in out.read_text(encoding="utf-8").splitlines():
        number, kind, where, name = line.split("\t")
        counts.append((int(number), kind, where, name))
    return Counted(answered, counts)


def measure(
    model_root: Path,
    request: pb.PredictRequest,
    levels: Sequence[int],
    seconds: float,
    source: Path = REPO,
) -> dict[tuple[str, int], Counted]:
    """The echo's and xylen's unary Predict's counts at each level, servers side by side."""
    with tempfile.TemporaryDirectory(prefix="xylen-bench-calls-") as work:
        return _measure(model_root, request, levels, seconds, source, Path(work))


def _measure(
    model_root: Path,
    request: pb.PredictRequest,
    levels: Sequence[int],
    seconds: float,
    source: Path,
    work: Path,
) -> dict[tuple[str, int], Counted]:
    payload = request.SerializeToString()
    echo_out, xylen_out = work / "echo.tsv", work / "xylen.tsv"
    echo = Process(
        [sys.executable, "-m", "bench.echo_server"],
        counting_env(dict(os.environ), echo_out),
        "echo listening",
    )
    xylen = start_server(counting_env(xylen_env(model_root), xylen_out), source)
    counted: dict[tuple[str, int], Counted] = {}

    async def run() -> None:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{echo.port}") as echo_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{xylen.port}") as xylen_channel,
        ):
            bounce = echo_channel.unary_unary("/bench.Echo/Echo")
            stub = pb_grpc.ModelServiceStub(xylen_channel)
            for level in levels:
                counted["echo", level] = await count(
                    echo.proc.pid, echo_out, lambda: bounce(payload), level, seconds
                )
                counted["xylen", level] = await count(
                    xylen.proc.pid, xylen_out, lambda: stub.Predict(request), level, seconds
                )

    try:
        asyncio.run(run())
    finally:
        echo.stop()
        xylen.stop()
    return counted


def report(counted: dict[tuple[str, int], Counted], levels: Sequence[int], source: Path) -> None:
    print(
        f"  {'target':<24}{'in flight':>10}{'answered':>10}{'Python calls':>14}{'/echo':>7}"
        f"{'C calls':>10}{'/echo':>7}   (per answered call, event-loop thread)"
    )
    for level in levels:
        echo = counted["echo", level]
        for label, key in (("bare grpc.aio echo", "echo"), ("xylen Predict (unary)", "xylen")):
            got = counted[key, level]
            py, c = got.per_request("py"), got.per_request("c")
            print(
                f"  {label:<24}{level:>10}{got.answered:>10}{py:>14.1f}"
                f"{py / echo.per_request('py'):>6.2f}x{c:>10.1f}{c / echo.per_request('c'):>6.2f}x"
            )
    for level in levels:
        own = counted["xylen", level].own(source)
        print(
            f"  xylen's own functions at {level} in flight: {sum(n for n, _ in own):.1f} calls "
            "a request; the most called:"
        )
        for times, name in own[:12]:
            print(f"    {times:6.2f}  {name}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_calls")
    parser.add_argument("--seconds", type=float, default=3.0, help="counted per level")
    parser.add_argument(
        "--source", type=Path, default=REPO, help="the tree whose xylen_server to count"
    )
    args = parser.parse_args(argv)
    levels = (1, 32)
    with tempfile.TemporaryDirectory(prefix="xylen-bench-") as tmp:
        _, rows = build_model(Path(tmp))
        request = pb.PredictRequest(
            inputs=[pb.PredictInput(features=types_pb2.FeatureVector(values=rows[0].tolist()))]
        )
        print(
            "\n== Python work per request, counted: calls made by each server's event-loop "
            f"thread per answered call ({args.seconds:.0f}s counted per level; counting slows the "
            "servers, so no timings) =="
        )
        report(
            measure(Path(tmp), request, levels, args.seconds, args.source.resolve()),
            levels,
            args.source.resolve(),
        )


if __name__ == "__main__":
    main()
