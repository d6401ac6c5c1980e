"""A real Prometheus (Debian's ``prometheus`` package) on loopback scrapes a live model server and
a live coordinator with the project's alert rules loaded; calls are made, and Prometheus's HTTP
query API shows the series moved: requests counted, latency observed, the version info right
after a swap, the swap counted, the coordinator's fan-out counted. Skipped, saying so, where
the ``prometheus`` binary is not installed (``.ci/run`` installs it)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import harness
import pytest
from coordinator.coordinator_process import CoordinatorProcess
from coordinator.helpers import endpoint, free_port, write_config
from learning_helpers import add_version

from xylen.v1 import ensemble_service_pb2 as epb
from xylen.v1 import ensemble_service_pb2_grpc as epb_grpc
from xylen.v1 import model_service_pb2 as pb

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("prometheus not installed (apt-get install -y prometheus; .ci/run does it)")
    return found


class Prometheus:
    """``prometheus`` on a free loopback port scraping ``targets`` every second."""

    def __init__(self, binary: str, workdir: Path, targets: dict[str, int]) -> None:
        rules = workdir / "alerts.yml"
        shutil.copy(REPO / "deploy" / "prometheus" / "alerts.yml", rules)
        jobs = "".join(
            f'  - job_name: {job}\n    static_configs:\n      - targets: ["127.0.0.1:{port}"]\n'
            for job, port in targets.items()
        )
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {rules}\nscrape_configs:\n{jobs}"
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait(lambda: self.get("/-/ready") is not None, "Prometheus ready", 60)

    def get(self, path: str) -> dict | str | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                body = response.read().decode()
        except OSError:
            return None
        return json.loads(body) if path.startswith("/api/") else body

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        answer = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert isinstance(answer, dict) and answer["status"] == "success", answer
        return [(r["metric"], float(r["value"][1])) for r in answer["data"]["result"]]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return result[0][1] if len(result) == 1 else None

    def wait(self, check: Callable[[], object], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{what}: not seen\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.25)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


#: Series that exist only once their event happened (none happens in this test).
AFTER_AN_EVENT = {
    "xylen_rpc_sheds_total",
    "xylen_rpc_errors_total",
    "xylen_coordinator_missing_votes_total",
    "xylen_training_last_duration_seconds",
    "xylen_training_samples",
}


def check_dashboard(prometheus: Prometheus) -> None:
    """Every query of the Grafana dashboard is valid PromQL for this Prometheus, and every
    series it reads is one the server or coordinator exports."""
    dashboard = json.loads((REPO / "deploy" / "grafana" / "xylen.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 17
    names = prometheus.get("/api/v1/label/__name__/values")
    assert isinstance(names, dict)
    exported = set(names["data"])
    for expr in exprs:
        promql = expr.replace("$__rate_interval", "1m")
        answer = prometheus.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert isinstance(answer, dict) and answer["status"] == "success", (expr, answer)
        read = set(re.findall(r"\b((?:xylen|rpc|process)_[a-z_]+)\{", expr))
        assert read, expr
        assert read - exported <= AFTER_AN_EVENT, (expr, read - exported)


@pytest.fixture
def fleet(tmp_path: Path, candles) -> Iterator[tuple[harness.ServerProcess, CoordinatorProcess]]:
    models = tmp_path / "models"
    harness.write_model(models, "model_1", "lightgbm", candles, trees=30)
    add_version(models, 2, seed=2)
    server = harness.start_server(models, "model_1", log_dir=tmp_path)
    config = write_config(tmp_path / "config.yaml", [endpoint("model_1", server.port, 1.0)])
    coordinator = CoordinatorProcess(config, tmp_path / "coordinator.log", metrics=True)
    try:
        yield server, coordinator
    finally:
        assert coordinator.stop() == 0
        assert server.stop() == 0


@pytest.mark.slow
def test_prometheus_scrapes_the_server_and_coordinator(
    prometheus_binary, fleet, tmp_path, feature_rows
):
    server, coordinator = fleet
    assert server.metrics_port > 0
    prometheus = Prometheus(
        prometheus_binary,
        tmp_path,
        {"xylen-server": server.metrics_port, "xylen-coordinator": coordinator.metrics_port},
    )
    try:
        prometheus.wait(
            lambda: prometheus.value('sum(up{job=~"xylen-.*"})') == 2, "both targets up"
        )
        prometheus.wait(
            lambda: prometheus.value('xylen_model_info{model_version="1"}') == 1, "v1 info"
        )
        with grpc.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
            ensemble = epb_grpc.EnsembleServiceStub(channel)
            for row in feature_rows[20:25]:
                request = epb.EnsembleServicePredictRequest(inputs=[harness.feature_input(row)])
                assert len(ensemble.Predict(request, timeout=10).predictions) == 1
        with server.channel() as channel:
            stub = server.stub(channel)
            for row in feature_rows[:20]:
                stub.Predict(pb.PredictRequest(inputs=[harness.feature_input(row)]))
            moved = stub.RollbackModel(pb.RollbackModelRequest(version=2))
            assert moved.model_info.version == 2

        ok = 'job="xylen-server",rpc_method="Predict",rpc_grpc_status_code="OK"'
        prometheus.wait(
            lambda: prometheus.value(f"rpc_server_requests_total{{{ok}}}") == 20,
            "20 Predict calls counted",
        )
        assert prometheus.value(f"rpc_server_duration_seconds_count{{{ok}}}") == 20
        # The coordinator's 5 calls travel on its one long-lived PredictStream to the server.
        prometheus.wait(
            lambda: prometheus.value('sum(xylen_predict_rows_total{job="xylen-server"})') == 25,
            "25 rows predicted (20 direct, 5 through the coordinator)",
        )
        streams = 'rpc_server_active_requests{job="xylen-server",rpc_method="PredictStream"}'
        assert prometheus.value(streams) == 1
        assert prometheus.value(f"rpc_server_duration_seconds_sum{{{ok}}}") > 0
        p50 = prometheus.value(
            f"histogram_quantile(0.5, sum by (le) (rpc_server_duration_seconds_bucket{{{ok}}}))"
        )
        assert p50 is not None and 0 < p50 < 1
        prometheus.wait(
            lambda: prometheus.value('xylen_model_info{model_version="2"}') == 1, "v2 info"
        )
        info = prometheus.query("xylen_model_info")
        assert [labels["model_version"] for labels, _ in info] == ["2"]
        assert info[0][0]["model_type"] == "lightgbm" and info[0][0]["engine"] == "onnx"
        assert prometheus.value('xylen_model_swaps_total{kind="rolled_back"}') == 1
        assert prometheus.value("xylen_model_version") == 2
        prometheus.wait(
            lambda: prometheus.value('xylen_coordinator_predictions_total{outcome="ok"}') == 5,
            "5 ensemble calls counted",
        )
        assert (
            prometheus.value(
                'xylen_coordinator_endpoint_duration_seconds_count{endpoint="model_1"}'
            )
            == 5
        )
        assert prometheus.value('xylen_coordinator_weight{endpoint="model_1"}') == 1
        assert prometheus.value("sum(xylen_coordinator_decisions_total)") == 5
        assert prometheus.value("xylen_coordinator_feedback_queue_depth") == 0
        rules = prometheus.get("/api/v1/rules")
        assert isinstance(rules, dict)
        loaded = [r["name"] for g in rules["data"]["groups"] for r in g["rules"]]
        assert len(loaded) == 10 and "XylenPredictLatencyHigh" in loaded
        firing = prometheus.get("/api/v1/alerts")
        assert isinstance(firing, dict) and firing["data"]["alerts"] == []
        check_dashboard(prometheus)
    finally:
        assert prometheus.stop() == 0
