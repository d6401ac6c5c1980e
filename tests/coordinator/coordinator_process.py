"""A `xylen-coordinator serve` process for tests: started on a config with a free loopback
port, waited for until its health is SERVING, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import harness

from xylen.v1 import ensemble_service_pb2_grpc as epb_grpc

REPO = Path(__file__).resolve().parents[2]


METRICS_LINE = "xylen-coordinator metrics on port "
"""What ``serve`` prints after its listening line when its ``/metrics`` listens."""


class CoordinatorProcess:
    def __init__(self, config: Path, log: Path, metrics: bool = False) -> None:
        """``metrics``: the config serves ``/metrics``; its port is :attr:`metrics_port`."""
        self.log_path = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xylen_coordinator", "serve", "--config", str(config),
                 "--host", "127.0.0.1", "--port", "0", "--grace", "2"],
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("xylen-coordinator listening on port "), self.log()
        self.port = int(line.rsplit(" ", 1)[1])
        self.metrics_port = 0
        if metrics:
            line = self.proc.stdout.readline()
            assert line.startswith(METRICS_LINE), self.log()
            self.metrics_port = int(line[len(METRICS_LINE) :])
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = epb_grpc.EnsembleServiceStub(self.channel)
        harness_deadline = time.monotonic() + 30
        while time.monotonic() < harness_deadline:
            try:
                if harness.health_status(self.channel) == 1:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)
