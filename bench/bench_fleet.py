"""The fleet under load and with a hung server: a coordinator process in front of four model
server processes, all on this machine's loopback.

* ``load``: EnsembleService.Predict at rising concurrency (bounded: ``BENCH_FLEET_CALLS``
  calls per level, at most ``BENCH_FLEET_SECONDS`` each), p50/p99 latency, errors by status,
  sheds (RESOURCE_EXHAUSTED of the call or of a vote) and calls per second.
* ``hung server``: one server stopped with SIGSTOP, ensemble throughput for ``BENCH_HUNG_SECONDS``
  at concurrency 16 through a coordinator with outlier detection switched off (before) and one
  with it on (after), side by side with the healthy fleet; each window starts right after its
  own SIGSTOP (the server is let go with SIGCONT in between), within the keepalive's detection
  time, so what is measured is the ejection, not the keepalive.

Run: ``python -m bench fleet`` (or ``python -m bench.bench_fleet``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402
from coordinator.fleet_load import LoadReport, grpc_call, run_load  # noqa: E402

from xylen.v1 import ensemble_service_pb2_grpc as epb_grpc  # noqa: E402

MODELS = (("model_1", "lightgbm", 0.4), ("model_2", "xgboost", 0.3),
          ("model_3", "catboost", 0.2), ("model_4", "lightgbm", 0.1))  # fmt: skip
LEVELS = tuple(int(c) for c in os.environ.get("BENCH_FLEET_LEVELS", "1,8,32,128,256").split(","))
CALLS = int(os.environ.get("BENCH_FLEET_CALLS", "600"))
SECONDS = float(os.environ.get("BENCH_FLEET_SECONDS", "20"))
HUNG_SECONDS = float(os.environ.get("BENCH_HUNG_SECONDS", "4"))
DEADLINE_MS = 500


class CoordinatorProcess:
    def __init__(self, workdir: Path, name: str, servers: list[harness.ServerProcess],
                 outlier_detection: dict[str, Any]) -> None:  # fmt: skip
        config = {
            "model_endpoints": [
                {"name": n, "host": "127.0.0.1", "port": s.port, "weight": w}
                for (n, _, w), s in zip(MODELS, servers, strict=True)
            ],
            "deadline_ms": DEADLINE_MS,
            "feedback_queue": {"path": str(workdir / f"{name}.sqlite3")},
            "outlier_detection": outlier_detection,
        }
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log = workdir / f"{name}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xylen_coordinator", "--log-level", "WARNING", "serve",
                 "--config", str(path), "--host", "127.0.0.1", "--port", "0"],
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
            )  # fmt: skip
        assert self.proc.stdout is not None
        self.address = f"127.0.0.1:{int(self.proc.stdout.readline().rsplit(' ', 1)[1])}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


async def _warm(stub: epb_grpc.EnsembleServiceStub, inputs: list[Any]) -> None:
    call = grpc_call(stub, inputs, timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if len((await call()).voters) == len(MODELS):
                break
        except Exception:
            pass
        await asyncio.sleep(0.1)
    await run_load(call, 8, 100)


async def load(address: str, inputs: list[Any]) -> list[LoadReport]:
    reports = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = epb_grpc.EnsembleServiceStub(channel)
        await _warm(stub, inputs)
        for concurrency in LEVELS:
            report = await run_load(
                grpc_call(stub, inputs, timeout=10), concurrency, CALLS, SECONDS
            )
            missing = sum(report.missing().values())
            print(f"  {report.line()} missing-votes={missing}", flush=True)
            reports.append(report)
    return reports


async def hung(
    coordinators: dict[str, CoordinatorProcess], victim: harness.ServerProcess, inputs: list[Any]
) -> dict[str, float]:
    rates: dict[str, float] = {}
    channels = {k: grpc.aio.insecure_channel(c.address) for k, c in coordinators.items()}
    stubs = {k: epb_grpc.EnsembleServiceStub(ch) for k, ch in channels.items()}
    try:
        for stub in stubs.values():
            await _warm(stub, inputs)
        for label, key, stop in (
            ("healthy fleet", "ejection-on", False),
            ("hung, ejection off (before)", "ejection-off", True),
            ("hung, ejection on (after)", "ejection-on", True),
        ):
            if stop:
                victim.proc.send_signal(signal.SIGSTOP)
            try:
                report = await run_load(
                    grpc_call(stubs[key], inputs, timeout=10), 16, 10**9, HUNG_SECONDS
                )
            finally:
                if stop:
                    victim.proc.send_signal(signal.SIGCONT)
            rates[label] = report.calls / report.seconds
            print(f"  {label:<30} {report.line()} missing={dict(report.missing())}", flush=True)
            if stop:  # let it rejoin everywhere before the next window
                for stub in stubs.values():
                    await _warm(stub, inputs)
    finally:
        for channel in channels.values():
            await channel.close()
    return rates


def main() -> dict[str, Any]:
    print(f"fleet benchmark: coordinator + 4 model servers on {os.cpu_count()} cores, "
          f"deadline {DEADLINE_MS} ms")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="xylen-bench-fleet-") as tmp:
        workdir = Path(tmp)
        for i, (name, kind, _) in enumerate(MODELS, start=1):
            harness.write_model(workdir, name, kind, trees=60, seed=i)
        servers = [harness.start_server(workdir, name, wait=False) for name, _, _ in MODELS]
        coordinators: dict[str, CoordinatorProcess] = {}
        try:
            for server in servers:
                server.wait_serving()
            candles = harness.synthetic_candles(400)
            inputs = [harness.window_input(candles, 350)]
            coordinators["ejection-on"] = CoordinatorProcess(workdir, "on", servers, {})
            coordinators["ejection-off"] = CoordinatorProcess(
                workdir, "off", servers, {"enabled": False}
            )
            print(f"load (EnsembleService.Predict, one window, up to {CALLS} calls a level):")
            reports = asyncio.run(load(coordinators["ejection-on"].address, inputs))
            print(f"hung server (model_4 under SIGSTOP, concurrency 16, {HUNG_SECONDS:g}s each):")
            rates = asyncio.run(hung(coordinators, servers[3], inputs))
        finally:
            for coordinator in coordinators.values():
                coordinator.stop()
            for server in servers:
                server.proc.send_signal(signal.SIGCONT)
                server.stop()
    before = rates["hung, ejection off (before)"]
    after = rates["hung, ejection on (after)"]
    healthy = rates["healthy fleet"]
    print(f"hung-server throughput: {before:.0f}/s before, {after:.0f}/s after "
          f"({after / before:.1f}x); healthy {healthy:.0f}/s (after = {after / healthy:.0%} "
          "of healthy)")  # fmt: skip
    return {"load": reports, "hung": rates}


if __name__ == "__main__":
    main()
