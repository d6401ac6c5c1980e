"""``make up`` / ``make down`` / ``make status``: the compose stack as local processes.

compose.yaml is the one description of the stack: the model servers are its ``model-server-N``
services (MODEL_NAME, GRPC_PORT, METRICS_PORT from their ``environment``, the rest from
``deploy/xylen.env``, their ``env_file``), the coordinator runs the compose ``command`` with
``deploy/coordinator.yaml``. Locally every part listens on 127.0.0.1 on the same ports, the
servers serve ``models/`` (compose's ``./models:/models``), their data volumes are
``run/stack/data/<service>/``, the admin token (compose's secret) is ``run/stack/admin.token``,
and each part's log is ``run/stack/<part>.log``. Prometheus joins where the ``prometheus``
binary and ``deploy/prometheus/prometheus.yml`` exist.

    python -m xylen_server.devtools.stack up [--run-dir run/stack] [--models models]
    python -m xylen_server.devtools.stack status
    python -m xylen_server.devtools.stack down

``up`` starts what is not running (so after a crash it restarts just the missing part), waits
until every part is healthy and prints where each listens; ``down`` sends SIGTERM (SIGKILL after
the grace time) and waits until nothing is left; ``status`` prints each part's pid and health
and exits 0 only when all are healthy. ``--port-map 8001=18001,...`` moves ports (tests);
``status`` and ``down`` use the map ``up`` was given (kept in ``run/stack/stack.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xylen_server.probe import check

SERVER_PREFIX = "model-server-"
COORDINATOR = "coordinator"
PROMETHEUS = "prometheus"
STATE_FILE = "stack.json"


@dataclass(frozen=True)
class Part:
    """One process of the stack."""

    name: str
    argv: list[str]
    env: dict[str, str]
    address: str
    """host:port of its gRPC health (or Prometheus's HTTP) endpoint."""
    kind: str = "grpc"
    listens: list[str] = field(default_factory=list)


def read_env_file(path: Path) -> dict[str, str]:
    """VAR=value lines (compose ``env_file`` syntax without quotes); # comments."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def load_compose(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def model_services(compose: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``model-server-N`` -> its environment (strings), in compose order."""
    return {
        name: {str(k): str(v) for k, v in (service.get("environment") or {}).items()}
        for name, service in compose["services"].items()
        if name.startswith(SERVER_PREFIX)
    }


def mismatches(compose: Mapping[str, Any], coordinator_config: Mapping[str, Any]) -> list[str]:
    """How compose's model servers and the coordinator's endpoints disagree (empty: they agree).

    Each endpoint must be a model-server service (``host``) whose MODEL_NAME is the endpoint's
    ``name`` and whose GRPC_PORT is its ``port``, and each model-server an endpoint."""
    services = model_services(compose)
    problems = []
    endpoints = coordinator_config.get("model_endpoints") or []
    seen = set()
    for endpoint in endpoints:
        host, name, port = endpoint.get("host"), endpoint.get("name"), endpoint.get("port")
        seen.add(host)
        env = services.get(host)
        if env is None:
            problems.append(f"endpoint {name}: no compose service {host!r}")
            continue
        if env.get("MODEL_NAME") != name:
            problems.append(f"endpoint {name}: {host} serves MODEL_NAME={env.get('MODEL_NAME')}")
        if env.get("GRPC_PORT") != str(port):
            problems.append(f"endpoint {name}: {host} listens on GRPC_PORT={env.get('GRPC_PORT')}")
    for host in services:
        if host not in seen:
            problems.append(f"compose service {host} is not a coordinator endpoint")
    return problems


class Stack:
    """The stack of ``root`` (compose.yaml, deploy/) run as local processes under ``run_dir``."""

    def __init__(
        self,
        root: Path,
        run_dir: Path,
        models: Path,
        port_map: Mapping[int, int] | None = None,
        prometheus: bool = True,
    ) -> None:
        self.root = root.resolve()
        self.run_dir = run_dir.resolve()
        self.models = models.resolve()
        self.port_map = dict(port_map or {})
        self.prometheus = prometheus
        self.compose = load_compose(self.root / "compose.yaml")
        self.token_file = self.run_dir / "admin.token"

    def port(self, port: int | str) -> int:
        return self.port_map.get(int(port), int(port))

    # -- what runs ------------------------------------------------------------------------------

    def parts(self) -> list[Part]:
        base = dict(os.environ)
        base.update(PYTHONUNBUFFERED="1", ADMIN_TOKEN_FILE=str(self.token_file))
        for env_file in self.compose["x-model-server"].get("env_file", []):
            base.update(read_env_file(self.root / env_file))
        parts = []
        for service, service_env in model_services(self.compose).items():
            env = dict(base)
            env.update(service_env)
            grpc_port, metrics_port = self.port(env["GRPC_PORT"]), self.port(env["METRICS_PORT"])
            env.update(
                GRPC_HOST="127.0.0.1",
                GRPC_PORT=str(grpc_port),
                METRICS_PORT=str(metrics_port),
                MODEL_PATH=str(self.models),
                FEEDBACK_DATA_DIR=str(self.run_dir / "data" / service),
                ADMIN_TOKEN_FILE=str(self.token_file),
            )
            address = f"127.0.0.1:{grpc_port}"
            parts.append(
                Part(
                    service,
                    [sys.executable, "-m", "xylen_server"],
                    env,
                    address,
                    listens=[f"gRPC {address}", f"metrics 127.0.0.1:{metrics_port}"],
                )
            )
        command = list(self.compose["services"][COORDINATOR]["command"])
        port = self.port(command[command.index("--port") + 1])
        command[command.index("--config") + 1] = str(self.run_dir / "coordinator.yaml")
        command[command.index("--host") + 1] = "127.0.0.1"
        command[command.index("--port") + 1] = str(port)
        listens = [f"gRPC 127.0.0.1:{port}"]
        if "--metrics-port" in command:
            at = command.index("--metrics-port") + 1
            command[at] = str(self.port(command[at]))
            listens.append(f"metrics 127.0.0.1:{command[at]}")
        env = dict(base)
        env.update(GRPC_HOST="127.0.0.1")
        address = f"127.0.0.1:{port}"
        parts.append(
            Part(
                COORDINATOR,
                [sys.executable, "-m", "xylen_coordinator", *command],
                env,
                address,
                listens=listens,
            )
        )
        config = self.root / "deploy" / "prometheus" / "prometheus.yml"
        binary = shutil.which("prometheus")
        if self.prometheus and binary and config.exists():
            address = f"127.0.0.1:{self.port(9090)}"
            parts.append(
                Part(
                    PROMETHEUS,
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={self.run_dir / 'prometheus'}",
                        f"--web.listen-address={address}",
                    ],
                    dict(os.environ),
                    address,
                    kind="http",
                    listens=[f"http://{address}"],
                )
            )
        return parts

    def write_coordinator_config(self) -> None:
        """deploy/coordinator.yaml with every host 127.0.0.1 and its paths under run_dir."""
        with open(self.root / "deploy" / "coordinator.yaml") as f:
            config = yaml.safe_load(f)
        for endpoint in config["model_endpoints"]:
            endpoint["host"] = "127.0.0.1"
            endpoint["port"] = self.port(endpoint["port"])
        config.setdefault("feedback_queue", {})["path"] = str(
            self.run_dir / "data" / COORDINATOR / "feedback.sqlite3"
        )
        config.setdefault("auth", {})["token_file"] = str(self.token_file)
        (self.run_dir / "coordinator.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    # -- state ----------------------------------------------------------------------------------

    def state(self) -> dict[str, int]:
        """Part name -> pid of what ``up`` started (``stack.json``)."""
        return dict(self._saved().get("pids", {}))

    def _saved(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.run_dir / STATE_FILE).read_text()))
        except FileNotFoundError:
            return {}

    def saved_port_map(self) -> dict[int, int]:
        """The ``--port-map`` the running stack was started with."""
        return {int(a): int(b) for a, b in self._saved().get("port_map", {}).items()}

    def save(self, pids: Mapping[str, int]) -> None:
        state = {"pids": dict(pids), "port_map": {str(a): b for a, b in self.port_map.items()}}
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=1))

    def healthy(self, part: Part) -> bool:
        if part.kind == "http":
            try:
                with urllib.request.urlopen(f"http://{part.address}/-/ready", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False
        return check(part.address, timeout=2.0) == "SERVING"

    # -- commands -------------------------------------------------------------------------------

    def up(self, timeout: float = 180.0) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.token_file.exists():
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        self.write_coordinator_config()
        parts = self.parts()
        pids = self.state()
        for part in parts:
            if alive(pids.get(part.name)):
                continue
            (self.run_dir / "data" / part.name).mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / f"{part.name}.log", "a") as log:
                proc = subprocess.Popen(
                    part.argv,
                    env=part.env,
                    cwd=self.root,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            pids[part.name] = proc.pid
            self.save(pids)
        deadline = time.monotonic() + timeout
        waiting = list(parts)
        while waiting and time.monotonic() < deadline:
            for part in list(waiting):
                if not alive(pids[part.name]):
                    log_path = self.run_dir / f"{part.name}.log"
                    tail = log_path.read_text().splitlines()[-5:] if log_path.exists() else []
                    print(f"{part.name} exited; the end of {log_path}:", *tail, sep="\n  ")
                    return 1
                if self.healthy(part):
                    waiting.remove(part)
            time.sleep(0.2)
        if waiting:
            print("not healthy after", timeout, "s:", ", ".join(p.name for p in waiting))
            return 1
        for part in parts:
            print(f"{part.name:<16} pid {pids[part.name]:<8} {'  '.join(part.listens)}")
        print(f"logs in {self.run_dir}/*.log; admin token {self.token_file}; `make down` stops it")
        return 0

    def status(self) -> int:
        pids = self.state()
        ok = True
        for part in self.parts():
            pid = pids.get(part.name)
            if not alive(pid):
                word = "STOPPED"
            else:
                word = "SERVING" if self.healthy(part) else "NOT_HEALTHY"
            ok = ok and word == "SERVING"
            print(
                f"{part.name:<16} pid {pid if alive(pid) else '-'!s:<8} {word:<12} {part.address}"
            )
        return 0 if ok else 3

    def down(self, grace: float = 30.0) -> int:
        pids = self.state()
        order = [COORDINATOR, PROMETHEUS] + [n for n in pids if n not in (COORDINATOR, PROMETHEUS)]
        for name in order:
            pid = pids.get(name)
            if alive(pid):
                assert pid is not None
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for name, pid in pids.items():
            if alive(pid):
                print(f"{name} (pid {pid}) ignored SIGTERM for {grace}s: SIGKILL")
                os.killpg(pid, signal.SIGKILL)
        while any(alive(p) for p in pids.values()):
            time.sleep(0.05)
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)
        print(f"stopped {len(pids)} processes" if pids else "nothing was running")
        return 0


def alive(pid: int | None) -> bool:
    """Whether ``pid`` runs one of the stack's programs (not a zombie, not a reused pid)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    return b"xylen" in cmdline or b"prometheus" in cmdline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xylen_server.devtools.stack")
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository")
    parser.add_argument("--run-dir", type=Path, default=Path("run/stack"))
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--port-map", default="", help="8001=18001,... (tests)")
    parser.add_argument("--no-prometheus", action="store_true")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds `up` waits")
    args = parser.parse_args(argv)
    port_map = {
        int(a): int(b)
        for a, b in (item.split("=") for item in args.port_map.split(",") if item.strip())
    }
    stack = Stack(args.root, args.run_dir, args.models, port_map, not args.no_prometheus)
    if args.command != "up" and not port_map:
        stack.port_map = stack.saved_port_map()  # status / down: the ports up used
    if args.command == "up":
        missing = [
            name
            for name, env in model_services(stack.compose).items()
            if not (stack.models / env["MODEL_NAME"] / "metadata.json").exists()
        ]
        if missing:
            print(f"no trained model for {', '.join(missing)} in {stack.models}: run `make train`")
            return 2
        return stack.up(args.timeout)
    if args.command == "status":
        return stack.status()
    return stack.down()


if __name__ == "__main__":
    sys.exit(main())
