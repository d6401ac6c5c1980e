"""Every core: ``WORKERS=N`` server processes on one gRPC port, and the supervisor that runs them.

One Python process serves on one core at most. With ``WORKERS`` above 1 (or ``auto``: the CPUs
this process may use, see :func:`available_cpus`) ``xylen-server`` becomes a *supervisor*: it
imports no gRPC at all (grpc's ``examples/python/multiprocessing``: no gRPC object may exist in
the parent of the workers), reserves the port, and starts N workers, each an ordinary server
process (``python -m xylen_server serve`` with ``WORKER_INDEX``) whose gRPC server binds the
same port with ``SO_REUSEPORT``; the kernel spreads the connections over them.

The port. The supervisor first binds the port *without* ``SO_REUSEPORT`` (so a port any other
socket holds, a second supervisor's included, stops it with exit 2, as a single server is
stopped), then holds it bound with ``SO_REUSEPORT`` and not listening, for the life of the
workers: a socket that is bound but does not listen takes no connections, and any unrelated
process (a ``WORKERS=1`` server binds with ``SO_REUSEPORT`` off) still fails to bind it.

Talking to the workers. Each worker's stdin and stdout are pipes to the supervisor: it prints
``xylen-worker ready`` once its model is loaded, checked and warmed; the supervisor writes
``serving`` to every worker once all of them are ready and ``hold`` as soon as one is not, and
a worker reports grpc.health.v1 SERVING only between the two (:class:`~xylen_server.health.Health`
``gated``), so a probe on the shared port sees SERVING only when every worker is. EOF on its
stdin (the supervisor died) stops a worker. Other stdout lines of a worker go to the
supervisor's stderr; stderr (the log) is shared.

CPUs. By default the kernel places the workers' threads. With ``WORKER_CPU_AFFINITY=auto``
and exactly as many CPUs as workers, worker i is given the i-th CPU the supervisor may use
(``WORKER_CPU``, :func:`worker_cpus`) and pins every thread of itself to it first thing
(:func:`pin_to_cpu`), before grpc and onnxruntime start theirs, which inherit it. A call is
handed between a worker's threads (grpc's, the asyncio loop's) several times; pinned, those
hand-offs wake no other core. Measured on a quiet 2-core machine (``python -m bench
workers``): with the Python load client on the same cores, two pinned workers cost 1.17x one
process's server CPU per call against 1.30x unpinned; with a light C client (h2load) both cost
1.15x and the unpinned ones served more calls (1.21x one process's against 0.99x), so pinning
is not the default. The supervisor stays unpinned (it does no work per call). At one offered
load for all (the bench's ``offered`` part) two workers cost 1.16-1.22x one worker's CPU per
call and two bare grpc.aio echo processes 1.17-1.21x one echo's, with the same wake-ups per
call: what splitting a load over two processes on two shared cores costs, not a worker's work.

Signals. SIGTERM (or SIGINT) is passed to every worker; each flips to NOT_SERVING, drains its
calls for ``SHUTDOWN_GRACE_SECONDS`` and exits 0; the supervisor exits 0 when all did. The exit
status judges the stop, not what happened before it: only the workers running when SIGTERM
arrived (and a restart that was starting then, which is stopped at once) are told to drain, and
the supervisor exits 1 only when one of those did not exit 0 (or by that SIGTERM before it
installed its handler, i.e. while still loading: nothing in flight) or had to be killed after
``SHUTDOWN_GRACE_SECONDS`` + 30 s. A worker that had died before (just killed, or waiting out its
restart backoff) was already logged and is simply not started again: an orderly stop that
happens to come during a restart still exits 0. SIGHUP is
passed to every worker (the owner reloads the model directory, the others follow it). A worker
that dies is logged and started again after a backoff (0.5 s doubling to 30 s, back to 0.5 s
after it ran a minute); one that cannot start the first time (a bad model, a bad setting: exit
2) stops the supervisor with exit 2.

Learning (``xylen_server.server``). Worker 0 is the *owner*: it alone opens the feedback store,
runs retrain jobs and writes the model directory and its history. The other workers forward
Feedback, Retrain, WatchRetrain, RollbackModel and ReloadModel to the owner over its unix socket
(in ``WORKER_RUN_DIR``, a 0700 directory of the supervisor's), with the caller their own
credentials check established; their GetModelInfo reports the owner's training status. Each
worker keeps its own in-memory prediction log (and writes its Parquet parts under
``<PREDICTION_LOG_DIR>/worker-<i>/``, worker 0 in the directory itself); a Feedback whose id the
owner did not answer is looked up in the other workers' logs over their sockets. After every
swap (promotion, rollback, reload) the owner tells every other worker to load the model
directory, and answers the RPC once they have; the others also check the model directory every 2
s, so a worker that was restarting during a swap catches up.

Metrics. Each worker serves ``/metrics`` and ``/health`` on a unix socket; the supervisor serves
``METRICS_PORT``: ``/metrics`` is every worker's series with a ``worker`` label (histograms
stay whole per worker; ``sum by (le)`` merges them), plus ``xylen_workers``,
``xylen_worker_ready`` and ``xylen_worker_restarts_total``; ``/health`` is 200 only when every
worker is ready, with each worker's own ``/health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xylen_server.errors import SettingsError
from xylen_server.settings import Settings
from xylen_server.telemetry import MetricsHttp

logger = logging.getLogger(__name__)

READY = "xylen-worker ready"
"""The line a worker prints on stdout once it can serve."""
LISTENING = "xylen-server listening on port "
METRICS = "xylen-server metrics on port "

RESTART_BACKOFF_SECONDS = (0.5, 30.0)
"""First and longest wait before a dead worker is started again (doubling in between)."""
STABLE_SECONDS = 60.0
"""A worker that ran this long starts again after the shortest wait."""
SCRAPE_TIMEOUT_SECONDS = 5.0


# -- how many ------------------------------------------------------------------------------


def cpu_quota(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """CPUs the cgroup CPU quota allows this process (``0.5`` for ``cpus: '0.5'``), or None
    when no quota applies. cgroup v2: the smallest ``cpu.max`` (``"<quota> <period>"`` or
    ``"max <period>"``) of this process's cgroup and its ancestors; v1: ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` of the cpu controller (-1: none)."""
    own: list[str] = []
    v1_path = ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
            if hierarchy == "0" and controllers == "":
                own = [part for part in path.strip().split("/") if part]
            elif "cpu" in controllers.split(","):
                v1_path = path.strip()
    except OSError:
        pass
    limits: list[float] = []
    if (cgroup_root / "cgroup.controllers").exists() or (cgroup_root / "cpu.max").exists():
        for depth in range(len(own), -1, -1):
            quota = _read_v2(cgroup_root.joinpath(*own[:depth]) / "cpu.max")
            if quota is not None:
                limits.append(quota)
    else:
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            base = cgroup_root / name
            for directory in (base / v1_path.lstrip("/"), base):
                quota = _read_v1(directory)
                if quota is not None:
                    limits.append(quota)
                    break
            if limits:
                break
    return min(limits) if limits else None


def _read_v2(path: Path) -> float | None:
    try:
        words = path.read_text().split()
    except OSError:
        return None
    if len(words) != 2 or words[0] == "max":
        return None
    try:
        quota, period = int(words[0]), int(words[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read_v1(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text().strip())
        period = int((directory / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cpus(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """CPUs this process may use: its affinity, capped by the cgroup quota rounded down; at
    least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        count = min(count, math.floor(quota))
    return max(1, count)


def worker_count(setting: str, **where: Any) -> int:
    """The number of workers ``WORKERS`` asks for (``auto``: :func:`available_cpus`)."""
    word = setting.strip().lower()
    return available_cpus(**where) if word == "auto" else max(1, int(word))


def worker_cpus(setting: str, count: int, allowed: Sequence[int] | None = None) -> list[int]:
    """The CPU each of ``count`` workers pins itself to (``WORKER_CPU_AFFINITY``): ``auto``
    gives worker i the i-th of the CPUs this process may use (``allowed``; default its
    affinity) when there are exactly ``count`` of them, i.e. the CPUs are this server's (a
    cpuset, a whole host with ``WORKERS=auto``); otherwise, and with ``off``, -1 for every
    worker (not pinned: the kernel places their threads). Not with more CPUs than workers:
    a server capped by a CFS quota on a bigger node (``WORKERS=auto`` from the quota) would
    pin every replica to the node's first CPUs, stacking them on the same cores while the
    quota lets them run anywhere; nor with fewer, which could only stack the workers."""
    if allowed is None:
        try:
            allowed = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            allowed = []
    if setting.strip().lower() != "auto" or len(allowed) != count:
        return [-1] * count
    return list(sorted(allowed)[:count])


def pin_to_cpu(cpu: int) -> bool:
    """Pin every thread of this process to ``cpu`` (threads started later inherit it from the
    one that starts them). A worker does this first thing, before grpc or onnxruntime start
    their threads. False, and the process left as it was, when the CPU cannot be used."""
    try:
        tasks = [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        tasks = [0]
    try:
        for task in tasks:
            with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
                os.sched_setaffinity(task, {cpu})
    except (AttributeError, OSError, ValueError) as exc:
        logger.warning("cannot pin this worker to CPU %d (%s): left to the kernel", cpu, exc)
        return False
    return True


# -- the port ------------------------------------------------------------------------------


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` (0: a free port) for the workers: refused if anything holds it, then
    held with ``SO_REUSEPORT``, not listening. Raises OSError naming the address."""
    bare = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot bind gRPC port {host}:{port}: {exc}") from exc
    probe = socket.socket(family, kind, proto)
    try:
        probe.bind(address)  # no SO_REUSEPORT: fails if any socket holds the port
        port = probe.getsockname()[1]
    except OSError as exc:
        raise OSError(f"cannot bind gRPC port {host}:{port}: {exc.strerror or exc}") from exc
    finally:
        probe.close()
    held = socket.socket(family, kind, proto)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((*address[:1], port, *address[2:]))
    except OSError as exc:
        held.close()
        raise OSError(f"cannot bind gRPC port {host}:{port}: {exc.strerror or exc}") from exc
    return held


# -- metrics -------------------------------------------------------------------------------


def merge_metrics(pages: Sequence[tuple[int, str]]) -> str:
    """Prometheus text of several workers as one page: each sample gets a ``worker`` label;
    each family's ``# HELP``/``# TYPE`` once, its samples (every worker's) together."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for index, text in pages:
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                lines = headers.setdefault(family, [])
                samples.setdefault(family, [])
                if not any(old.startswith(line[:7]) for old in lines):
                    lines.append(line)
                continue
            if line.startswith("#"):
                continue
            key = family or line.split("{", 1)[0].split(" ", 1)[0]
            headers.setdefault(key, [])
            samples.setdefault(key, []).append(with_label(line, "worker", str(index)))
    out: list[str] = []
    for key, lines in samples.items():
        out.extend(headers.get(key, []))
        out.extend(lines)
    return "\n".join(out) + "\n" if out else ""


def with_label(sample: str, name: str, value: str) -> str:
    """One Prometheus sample line with ``name="value"`` as its first label."""
    label = f'{name}="{value}"'
    brace = sample.find("{")
    space = sample.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        rest = sample[brace + 1 :]
        return f"{sample[: brace + 1]}{label}{'' if rest.startswith('}') else ','}{rest}"
    return f"{sample[:space]}{{{label}}}{sample[space:]}"


def http_get_unix(path: Path, route: str, timeout: float = SCRAPE_TIMEOUT_SECONDS) -> bytes:
    """The body of ``GET route`` from the HTTP endpoint on the unix socket ``path`` (blocking);
    raises OSError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(path))
        conn.sendall(f"GET {route} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        raise OSError(f"bad answer from {path}")
    return body


# -- the supervisor ------------------------------------------------------------------------


@dataclass
class Worker:
    """One worker process and what the supervisor knows of it."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    started: float = 0.0
    backoff: float = RESTART_BACKOFF_SECONDS[0]
    ever_ready: bool = False
    health: dict[str, Any] = field(default_factory=dict)
    cpu: int = -1
    """The CPU the worker pins itself to (-1: none; ``WORKER_CPU_AFFINITY``)."""
    told_to_stop: bool = False
    """Sent SIGTERM by the supervisor's stop while running: its exit status counts."""

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Supervisor:
    """Runs ``count`` workers on one port until SIGTERM (see the module docstring)."""

    def __init__(self, settings: Settings, count: int, held: socket.socket) -> None:
        self.settings = settings
        self.count = count
        self.held = held
        self.port = int(held.getsockname()[1])
        self.run_dir = Path(tempfile.mkdtemp(prefix="xylen-workers-"))
        self.run_dir.chmod(0o700)
        self.workers = [Worker(i) for i in range(count)]
        for worker, cpu in zip(
            self.workers, worker_cpus(settings.worker_cpu_affinity, count), strict=True
        ):
            worker.cpu = cpu
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self._gate: bool | None = None
        self.metrics_http: MetricsHttp | None = None

    def environment(self, index: int) -> dict[str, str]:
        """A worker's environment: the supervisor's, with its index, the port and its own
        prediction log directory."""
        env = dict(os.environ)
        log_dir = self.settings.prediction_log_path.absolute()
        if index:
            log_dir = log_dir / f"worker-{index}"
        env.update(
            WORKERS=str(self.count),
            WORKER_INDEX=str(index),
            WORKER_RUN_DIR=str(self.run_dir),
            GRPC_PORT=str(self.port),
            PREDICTION_LOG_DIR=str(log_dir),
            PYTHONUNBUFFERED="1",
            WORKER_CPU=str(self.workers[index].cpu),
        )
        return env

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        print(f"{LISTENING}{self.port}", flush=True)
        if self.settings.metrics_enabled:
            self.metrics_http = MetricsHttp(_Merged(self), self._health, self._refresh)
            try:
                port = await self.metrics_http.start(self.settings.host, self.settings.metrics_port)
            except SettingsError as exc:
                print(f"xylen-server: error: {exc}", file=sys.stderr, flush=True)
                return 2
            print(f"{METRICS}{port}", flush=True)
        logger.info(
            "supervising %d workers on %s:%d (run dir %s, CPUs %s)",
            self.count,
            self.settings.host,
            self.port,
            self.run_dir,
            ", ".join(str(w.cpu) if w.cpu >= 0 else "any" for w in self.workers),
        )
        tasks = [asyncio.ensure_future(self._keep(worker)) for worker in self.workers]
        await self.stopping.wait()
        running = self._stop_workers()
        logger.info("shutting down: SIGTERM to %d of %d workers", running, self.count)
        limit = self.settings.shutdown_grace_seconds + 30.0
        _, pending = await asyncio.wait(tasks, timeout=limit)
        for worker in self.workers:
            if worker.alive and worker.proc is not None:
                logger.error("worker %d (pid %d) did not stop: SIGKILL", worker.index, worker.pid)
                worker.proc.kill()
        if pending:
            await asyncio.wait(pending, timeout=10)
            self.exit_code = self.exit_code or 1
        if self.metrics_http is not None:
            await self.metrics_http.stop()
        self.held.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        codes = [w.proc.returncode for w in self.workers if w.proc is not None]
        # -SIGTERM: a worker still starting, before its handler was installed (nothing in flight)
        failed = [
            w
            for w in self.workers
            if w.told_to_stop
            and w.proc is not None
            and w.proc.returncode not in (0, -signal.SIGTERM)
        ]
        for worker in failed:
            logger.error(
                "worker %d (pid %d) did not drain: exit %s",
                worker.index,
                worker.pid,
                worker.proc.returncode if worker.proc is not None else None,
            )
        if self.exit_code == 0 and failed:
            self.exit_code = 1
        logger.info("stopped (workers exited %s)", codes)
        return self.exit_code

    def _stop_workers(self) -> int:
        """SIGTERM to every worker still running, each marked ``told_to_stop``; the count.
        One that has exited or is being killed, even if not yet reaped, gets none: it died
        before the stop (:func:`exited`)."""
        told = 0
        for worker in self.workers:
            proc = worker.proc
            if proc is None or proc.returncode is not None or exited(proc.pid):
                if proc is not None:
                    logger.info(
                        "worker %d (pid %d) had died before the stop: its exit does not count",
                        worker.index,
                        proc.pid,
                    )
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            worker.told_to_stop = True
            told += 1
        return told

    def _forward(self, signum: int) -> None:
        for worker in self.workers:
            if worker.alive and worker.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signum)

    async def _keep(self, worker: Worker) -> None:
        """Run ``worker``, starting it again when it dies, until the supervisor stops."""
        while not self.stopping.is_set():
            await self._run_once(worker)
            if self.stopping.is_set():
                return
            code = worker.proc.returncode if worker.proc is not None else None
            if not worker.ever_ready and code == 2:
                logger.error("worker %d could not start (exit 2): stopping", worker.index)
                self.exit_code = 2
                self.stopping.set()
                return
            if time.monotonic() - worker.started >= STABLE_SECONDS:
                worker.backoff = RESTART_BACKOFF_SECONDS[0]
            how = f"signal {-code}" if code is not None and code < 0 else f"exit {code}"
            logger.error(
                "worker %d (pid %d) died (%s): starting it again in %.1fs",
                worker.index,
                worker.pid,
                how,
                worker.backoff,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), worker.backoff)
            if self.stopping.is_set():
                return
            worker.backoff = min(worker.backoff * 2, RESTART_BACKOFF_SECONDS[1])
            worker.restarts += 1

    async def _run_once(self, worker: Worker) -> None:
        worker.ready = False
        worker.started = time.monotonic()
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "xylen_server",
            "serve",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self.environment(worker.index),
        )
        logger.info("worker %d started (pid %d)", worker.index, worker.pid)
        if self.stopping.is_set() and not worker.told_to_stop:
            # SIGTERM came while it was being started: it missed the stop's SIGTERM.
            logger.info(
                "worker %d (pid %d) started during the stop: SIGTERM", worker.index, worker.pid
            )
            worker.proc.send_signal(signal.SIGTERM)
            worker.told_to_stop = True
        assert worker.proc.stdout is not None
        while line := await worker.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            if text == READY:
                worker.ready = worker.ever_ready = True
                logger.info("worker %d (pid %d) ready", worker.index, worker.pid)
                await self._update_gate(force=True)
            else:
                print(f"worker {worker.index}: {text}", file=sys.stderr, flush=True)
        await worker.proc.wait()
        worker.ready = False
        await self._update_gate()

    async def _update_gate(self, force: bool = False) -> None:
        """Tell every worker whether all are ready (``serving``) or not (``hold``)."""
        gate = all(w.ready for w in self.workers) and not self.stopping.is_set()
        if gate == self._gate and not force:
            return
        self._gate = gate
        word = b"serving\n" if gate else b"hold\n"
        for worker in self.workers:
            if worker.alive and worker.proc is not None and worker.proc.stdin is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    worker.proc.stdin.write(word)
                    await worker.proc.stdin.drain()
        if gate:
            logger.info("all %d workers ready: SERVING", self.count)

    # -- /metrics and /health -------------------------------------------------------------

    def metrics_socket(self, index: int) -> Path:
        return self.run_dir / f"metrics-{index}.sock"

    def render(self) -> bytes:
        """Every worker's series with a ``worker`` label, and the supervisor's (blocking)."""
        pages = []
        for worker in self.workers:
            if not worker.alive:
                continue
            try:
                body = http_get_unix(self.metrics_socket(worker.index), "/metrics")
            except OSError as exc:
                logger.debug("worker %d metrics unavailable: %s", worker.index, exc)
                continue
            pages.append((worker.index, body.decode(errors="replace")))
        own = [
            "# HELP xylen_workers Worker processes of this server.",
            "# TYPE xylen_workers gauge",
            f"xylen_workers {self.count}",
            "# HELP xylen_worker_ready Whether the worker is ready to serve (1) or not (0).",
            "# TYPE xylen_worker_ready gauge",
            *(f'xylen_worker_ready{{worker="{w.index}"}} {int(w.ready)}' for w in self.workers),
            "# HELP xylen_worker_restarts_total Times the worker was started again after it died.",
            "# TYPE xylen_worker_restarts_total counter",
            *(
                f'xylen_worker_restarts_total{{worker="{w.index}"}} {w.restarts}'
                for w in self.workers
            ),
        ]
        return (merge_metrics(pages) + "\n".join(own) + "\n").encode()

    async def _refresh(self) -> None:
        def scrape(worker: Worker) -> dict[str, Any]:
            try:
                body = http_get_unix(self.metrics_socket(worker.index), "/health")
                answer = json.loads(body)
            except (OSError, ValueError):
                return {}
            return answer if isinstance(answer, dict) else {}

        for worker in self.workers:
            worker.health = await asyncio.to_thread(scrape, worker) if worker.alive else {}

    def _health(self) -> tuple[Mapping[str, Any], bool]:
        serving = all(w.ready for w in self.workers) and not self.stopping.is_set()
        workers = [
            {
                "worker": w.index,
                "pid": w.pid,
                "ready": w.ready,
                "restarts": w.restarts,
                "cpu": w.cpu,
                "health": w.health,
            }
            for w in self.workers
        ]
        return {"serving": serving, "workers": workers}, serving


_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def exited(pid: int, proc: Path = Path("/proc")) -> bool:
    """Whether the child ``pid`` has exited or is being killed (reaped or not; it is left to be
    reaped). A process sent SIGKILL takes a while to exit (each of its threads must), during
    which waitid still finds it running; the kernel shows the kill in ``/proc/<pid>/status``
    at once: SIGKILL pending (``ShdPnd``/``SigPnd``) or the main thread a zombie."""
    try:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
    except ChildProcessError:  # reaped already
        return True
    try:
        status = (proc / str(pid) / "status").read_text()
    except FileNotFoundError:
        return (proc / "self").exists()  # /proc is there and the process is not
    except OSError:
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").strip()[:1] in ("Z", "X"):
        return True
    pending = 0
    for name in ("ShdPnd", "SigPnd"):
        with contextlib.suppress(ValueError):
            pending |= int(fields.get(name, "0").strip() or "0", 16)
    return bool(pending & _SIGKILL_BIT)


class _Merged:
    """What :class:`~xylen_server.telemetry.MetricsHttp` renders for the supervisor."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def render(self) -> bytes:
        return self.supervisor.render()


async def supervise(settings: Settings, count: int) -> int:
    """Run ``count`` workers on ``GRPC_HOST:GRPC_PORT`` until SIGTERM; the exit code."""
    try:
        held = reserve_port(settings.host, settings.grpc_port)
    except OSError as exc:
        print(f"xylen-server: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return await Supervisor(settings, count, held).run()
