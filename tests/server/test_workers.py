"""WORKERS=2: real processes on one port (xylen_server.workers and the worker side of
xylen_server.server): calls spread over both, one learning loop, swaps and Feedback reaching
every worker, one /metrics, kill -9 of a worker, SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import metrics_page
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from harness import feature_input, health_status, server_run, start_server, write_model
from learning_helpers import feedback, send_samples, wait_job
from metrics_page import by_label, by_labels, fetch, get, scrape

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen_server.devtools.launcher import ServerProcess

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
ROW = [0.001 * (i + 1) for i in range(25)]


def fleet(server: ServerProcess) -> dict[str, Any]:
    """The supervisor's /health."""
    answer = json.loads(get(f"{server.metrics_url}/health").text)
    assert isinstance(answer, dict)
    return answer


def counts(server: ServerProcess, method: str) -> dict[str, float]:
    """Calls of ``method`` answered OK so far, per worker, from the merged /metrics."""
    samples = scrape(f"{server.metrics_url}/metrics")
    return by_label(
        samples, "rpc_server_requests_total", "worker", rpc_method=method, rpc_grpc_status_code="OK"
    )


def one_call(server: ServerProcess, fn: Any) -> Any:
    """``fn(stub)`` on a connection of its own (the kernel picks the worker per connection;
    grpc shares one connection between channels to the same target unless told not to)."""
    with grpc.insecure_channel(server.address, options=OWN_CONNECTION) as channel:
        return fn(pb_grpc.ModelServiceStub(channel))


def predict(stub: pb_grpc.ModelServiceStub) -> pb.PredictResponse:
    return stub.Predict(pb.PredictRequest(inputs=[feature_input(ROW)]), timeout=30)


def wait_until(check: Any, timeout: float = 90.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@pytest.fixture(scope="module")
def root(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workers")
    shutil.copytree(models_root / "model_1", root / "models" / "model_1")
    return root


@pytest.fixture(scope="module")
def two(root: Path) -> Iterator[ServerProcess]:
    server = start_server(
        root / "models",
        env={
            "WORKERS": "2",
            "FEEDBACK_DATA_DIR": str(root / "data"),
            "RETRAIN_AUTO": "false",
            "PARITY_PROBE_ROWS": "256",
        },
        log_dir=root / "logs",
    )
    yield server
    server.stop()


def test_two_workers_serve_one_port_and_the_calls_spread_over_both(two: ServerProcess):
    health = fleet(two)
    assert health["serving"] is True
    pids = [w["pid"] for w in health["workers"]]
    assert len(set(pids)) == 2 and all(alive(pid) for pid in pids)
    assert two.proc.pid not in pids  # the supervisor serves no gRPC itself
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: one_call(two, predict), range(64)))
    assert all(len(a.predictions) == 1 for a in answers)
    per_worker = counts(two, "Predict")
    assert set(per_worker) == {"0", "1"}, per_worker
    assert all(n > 0 for n in per_worker.values()), per_worker
    with grpc.insecure_channel(two.address, options=OWN_CONNECTION) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_the_port_stays_protected_from_another_server(two: ServerProcess, root: Path):
    """A second server (one process, or another supervisor) on the workers' port stops with
    exit 2 and one line, as it would on any taken port."""
    for workers in ("1", "2"):
        env = {
            "PATH": "/usr/bin:/bin",
            "MODEL_PATH": str(root / "models"),
            "GRPC_HOST": "127.0.0.1",
            "GRPC_PORT": str(two.port),
            "METRICS_PORT": "0",
            "WORKERS": workers,
            "FEEDBACK_DATA_DIR": str(root / "other-data"),
        }
        result = server_run(env)
        assert result.returncode == 2, (workers, result.stderr[-2000:])
        assert f"cannot bind gRPC port 127.0.0.1:{two.port}" in result.stderr
    assert fleet(two)["serving"] is True


def test_merged_metrics_show_both_workers_with_whole_histograms(two: ServerProcess):
    one_call(two, predict)
    families = metrics_page.families(fetch(f"{two.metrics_url}/metrics"))
    duration = families["rpc_server_duration_seconds"]
    assert duration.type == "histogram"
    for worker in ("0", "1"):
        samples = [s for s in duration.samples if s.labels.get("worker") == worker]
        buckets = [s for s in samples if s.name.endswith("_bucket")]
        total = [s for s in samples if s.name.endswith("_count")]
        assert buckets and total
        # Each worker's histogram is whole: its +Inf bucket equals its count, per series.
        for count in total:
            key = {k: v for k, v in count.labels.items()}
            inf = [
                b
                for b in buckets
                if b.labels.get("le") == "+Inf"
                and {k: v for k, v in b.labels.items() if k != "le"} == key
            ]
            assert len(inf) == 1 and inf[0].value == count.value
    ready = {s.labels["worker"]: s.value for s in families["xylen_worker_ready"].samples}
    assert ready == {"0": 1.0, "1": 1.0}
    assert families["xylen_workers"].samples[0].value == 2
    rss = [s for s in families["process_memory_rss_bytes"].samples]
    assert {s.labels["worker"] for s in rss} == {"0", "1"}


def test_feedback_for_a_prediction_answered_by_either_worker_is_joined(two: ServerProcess):
    """Predict and Feedback on connections of their own until each worker has answered a
    prediction whose Feedback reached each worker; every Feedback (without features) is
    joined, i.e. found where it was predicted, and stored once by the owner."""
    seen: set[tuple[str, str]] = set()
    sent = 0
    for _ in range(300):
        before = counts(two, "Predict")
        answer = one_call(two, predict)
        after = counts(two, "Predict")
        by = [w for w in after if after[w] > before.get(w, 0)]
        assert len(by) == 1
        before_fb = counts(two, "Feedback")
        pid = answer.predictions[0].prediction_id
        reply = one_call(two, lambda stub, pid=pid: stub.Feedback(feedback(pid, 0.01), timeout=30))
        assert reply.duplicate is False
        sent += 1
        after_fb = counts(two, "Feedback")
        at = [w for w in after_fb if after_fb[w] > before_fb.get(w, 0)]
        assert len(at) == 1
        seen.add((by[0], at[0]))
        if len(seen) == 4:
            break
    assert seen == {("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}
    owner, other = fleet(two)["workers"]
    assert owner["health"]["feedback_samples"] >= sent  # the owner stored them all
    assert other["health"]["feedback_samples"] is None  # the other never opens the store


def test_every_worker_reports_the_owners_training_status(two: ServerProcess):
    """Only worker 0 runs retrain jobs; GetModelInfo on any connection reports its job (the
    other worker's own retrainer said IDLE on about half the connections)."""
    rows = np.random.default_rng(7).normal(size=(120, 25)).astype(np.float32)
    labels = (rows[:, 0] > 0).astype(np.int64)
    one_call(two, lambda stub: send_samples(stub, rows, labels, "status"))
    job = one_call(two, lambda s: s.Retrain(pb.RetrainRequest(dry_run=True), timeout=30)).job_id
    final = one_call(two, lambda stub: wait_job(stub, job))

    def status(stub: pb_grpc.ModelServiceStub) -> tuple[int, str]:
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).model_info
        return info.training_status.state, info.training_status.job_id

    before = counts(two, "GetModelInfo")
    with ThreadPoolExecutor(8) as pool:
        seen = set(pool.map(lambda _: one_call(two, status), range(32)))
    assert seen == {(final.state, job)}
    after = counts(two, "GetModelInfo")
    assert all(after[w] > before.get(w, 0) for w in ("0", "1")), (before, after)  # both asked


def test_each_worker_writes_its_prediction_log_parts_to_a_directory_of_its_own(
    two: ServerProcess, root: Path
):
    """Each worker's Parquet parts go to a directory of its own (worker 0: the usual one)."""

    def both_answered() -> bool:  # whatever ran before: the kernel picks a worker a connection
        one_call(two, predict)
        return set(counts(two, "Predict")) == {"0", "1"}

    wait_until(both_answered, what="a Predict answered by each worker")
    base = root / "data" / "model_1" / "prediction_log"
    wait_until(
        lambda: list(base.glob("part-*.parquet")) and list((base / "worker-1").glob("part-*")),
        what="both workers' prediction log parts",
    )
    assert np.all([p.stat().st_size > 0 for p in base.rglob("part-*.parquet")])


def test_a_swap_reaches_both_workers(two: ServerProcess, root: Path):
    """ReloadModel (on whichever worker takes it) after a new version is put in place, then
    RollbackModel: right after each answer, GetModelInfo on many connections agrees; then
    SIGHUP after another version is put in place."""
    staging = root / "staging"
    write_model(staging, "model_1", "lightgbm", trees=12, version=2, seed=2)
    live = root / "models" / "model_1"
    shutil.move(str(live), str(root / "old-model_1"))
    shutil.move(str(staging / "model_1"), str(live))

    def versions() -> set[int]:
        with ThreadPoolExecutor(8) as pool:
            infos = pool.map(
                lambda _: one_call(two, lambda s: s.GetModelInfo(pb.GetModelInfoRequest())),
                range(32),
            )
            return {info.model_info.version for info in infos}

    reloaded = one_call(two, lambda s: s.ReloadModel(pb.ReloadModelRequest(), timeout=120))
    assert reloaded.changed and reloaded.model_info.version == 2
    assert versions() == {2}
    rolled = one_call(two, lambda s: s.RollbackModel(pb.RollbackModelRequest(), timeout=120))
    assert rolled.model_info.version == 1 and rolled.previous_version == 2
    assert versions() == {1}
    # SIGHUP to the supervisor: every worker serves what the directory now holds.
    write_model(root / "staging3", "model_1", "lightgbm", trees=12, version=3, seed=3)
    shutil.move(str(live), str(root / "v1-model_1"))
    shutil.move(str(root / "staging3" / "model_1"), str(live))
    two.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: versions() == {3}, what="both workers on v3 after SIGHUP")
    per_worker = counts(two, "GetModelInfo")
    assert set(per_worker) == {"0", "1"}


def test_a_worker_killed_is_restarted_while_the_other_answers(two: ServerProcess):
    before = fleet(two)["workers"]
    victim = before[1]["pid"]
    os.kill(victim, signal.SIGKILL)
    # Connections the kernel had handed to the victim die with it; once it is gone, every new
    # connection goes to a listening worker: the other, then also the new one once it is ready
    # (a restarted worker joins the port only after its model is loaded).
    # Gone from /proc (reaped), not only a zombie main thread: the other threads of a killed
    # process still hold its sockets until they have exited too.
    wait_until(lambda: not Path(f"/proc/{victim}").exists(), what="the victim to be reaped")

    def probe() -> int:
        with grpc.insecure_channel(two.address, options=OWN_CONNECTION) as channel:
            return health_status(channel)

    # Not every worker is ready: the survivor answers calls but health says NOT_SERVING.
    wait_until(lambda: fleet(two)["serving"] is False, what="/health to say not serving")
    assert probe() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert get(f"{two.metrics_url}/health").status == 503
    answered = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = one_call(two, predict)  # every call is answered: the other worker has the port
        assert len(answer.predictions) == 1
        answered += 1
        workers = fleet(two)["workers"]
        if workers[1]["restarts"] == 1 and workers[1]["ready"]:
            break
    else:
        raise AssertionError("worker 1 was not restarted")
    assert answered >= 1
    after = fleet(two)
    assert after["serving"] is True
    assert after["workers"][1]["pid"] != victim and alive(after["workers"][1]["pid"])
    assert after["workers"][0]["pid"] == before[0]["pid"]
    log = two.log()
    assert f"worker 1 (pid {victim}) died (signal 9)" in log
    assert probe() == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_drains_both_workers_and_exits_zero(root: Path):
    """Calls in flight on both workers when SIGTERM arrives are answered; all exit 0."""
    server = start_server(
        root / "models",
        env={
            "WORKERS": "2",
            "FEEDBACK_DATA_DIR": str(root / "drain-data"),
            "RETRAIN_AUTO": "false",
            "PARITY_PROBE_ROWS": "256",
            "INFERENCE_DELAY_MS": "800",
            "LOOP_INFERENCE_BUDGET_US": "0",
        },
        log_dir=root / "drain-logs",
    )
    pids = [w["pid"] for w in fleet(server)["workers"]]
    with ThreadPoolExecutor(16) as pool:
        calls = [pool.submit(one_call, server, predict) for _ in range(16)]
        time.sleep(0.4)
        server.proc.send_signal(signal.SIGTERM)
        answers = [call.result(timeout=60) for call in calls]
    assert all(len(a.predictions) == 1 for a in answers)
    assert server.proc.wait(60) == 0
    assert not any(alive(pid) for pid in pids)
    log = server.log()
    assert log.count("stopped cleanly") == 2
    assert "workers exited [0, 0]" in log


def status_counts(server: ServerProcess, method: str) -> dict[tuple[str, ...], float]:
    """Calls of ``method`` so far by (worker, status code), from the merged /metrics."""
    samples = scrape(f"{server.metrics_url}/metrics")
    keys = ("worker", "rpc_grpc_status_code")
    return by_labels(samples, "rpc_server_requests_total", keys, rpc_method=method)


def test_forwarded_feedback_keeps_the_callers_credentials(root: Path):
    """With an admin token, Feedback is refused on either worker without it, and stored with
    the caller's identity (token:admin) whichever worker took it and forwarded it."""
    from xylen_server.learning.samples import read_samples

    token = "workers-test-token"
    data = root / "auth-data"
    server = start_server(
        root / "models",
        env={
            "WORKERS": "2",
            "FEEDBACK_DATA_DIR": str(data),
            "RETRAIN_AUTO": "false",
            "PARITY_PROBE_ROWS": "256",
            "ADMIN_TOKEN": token,
        },
        log_dir=root / "auth-logs",
    )
    try:
        bearer = (("authorization", f"Bearer {token}"),)
        stored = 0
        for _ in range(200):
            pid = one_call(server, predict).predictions[0].prediction_id
            with pytest.raises(grpc.RpcError) as refused:
                one_call(server, lambda s, pid=pid: s.Feedback(feedback(pid, 0.01), timeout=30))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = one_call(
                server,
                lambda s, pid=pid: s.Feedback(feedback(pid, 0.01), metadata=bearer, timeout=30),
            )
            assert reply.duplicate is False
            stored += 1
            seen = status_counts(server, "Feedback")
            if all(seen.get((w, c), 0) > 0 for w in "01" for c in ("OK", "UNAUTHENTICATED")):
                break
        else:
            raise AssertionError(f"Feedback did not reach both workers: {seen}")
    finally:
        assert server.stop() == 0
    samples = read_samples(data / "model_1")
    assert samples.height == stored
    assert set(samples.get_column("source").to_list()) == {"token:admin"}
