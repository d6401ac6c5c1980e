"""deploy/k8s/ rendered by the pinned ``kubectl kustomize`` and every object validated by
``kubernetes-validate --strict`` (Kubernetes' own OpenAPI schemas, unknown fields refused), then
what matters checked object by object: the seed's limits, native gRPC probes on the port the
server listens on, the restricted security context with a writable volume wherever the server
writes, a headless Service, HPA and PDB per model, and a coordinator config that the coordinator
accepts and that points at those Services.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from xylen_coordinator.config import parse_config
from xylen_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
K8S = ROOT / "deploy" / "k8s"
MODELS = ("model_1", "model_2", "model_3", "model_4")
#: Where the server and the coordinator write (Dockerfile: models, data, tmp; the coordinator's
#: outbox is under /data).
WRITABLE = ("/models", "/data", "/tmp")


def render(path: Path) -> str:
    result = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def validate(text: str, tmp: Path, *strict: str) -> subprocess.CompletedProcess[str]:
    manifest = tmp / "rendered.yaml"
    manifest.write_text(text)
    return subprocess.run(
        [str(BIN / "kubernetes-validate"), *strict, str(manifest)], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render(K8S)) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def port_of(c: dict[str, Any], name: str) -> int:
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == name))


def test_every_rendered_object_is_valid_with_strict(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    result = validate(render(K8S), tmp_path, "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    passed = [line for line in result.stdout.splitlines() if " passed for resource " in line]
    assert len(passed) == len(objects) == 23, result.stdout
    assert "WARN" not in result.stdout + result.stderr
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Namespace",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
    ]


def test_a_misspelled_field_fails_strict_validation(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    template = copy / "base" / "model-server" / "deployment.yaml"
    text = template.read_text()
    assert text.count("readOnlyRootFilesystem: true") == 1
    template.write_text(text.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"))
    mutated = render(copy)
    strict = validate(mutated, tmp_path, "--strict")
    assert strict.returncode != 0
    assert "readOnlyRootFileSystem" in strict.stdout + strict.stderr
    assert "deployment/model-server-1" in strict.stdout + strict.stderr
    # Without --strict the same typo passes: the reason the test uses --strict.
    assert validate(mutated, tmp_path).returncode == 0


def test_a_deployment_per_model_with_the_seeds_limits_and_grpc_probes(
    objects: list[dict[str, Any]],
) -> None:
    deployments = of_kind(objects, "Deployment")
    assert sorted(deployments) == ["coordinator", *(f"model-server-{i}" for i in range(1, 5))]
    for i, model in enumerate(MODELS, start=1):
        c = container(deployments[f"model-server-{i}"])
        env = env_of(c)
        assert env["MODEL_NAME"] == model
        grpc_port = port_of(c, "grpc")
        metrics_port = port_of(c, "metrics")
        assert int(env["GRPC_PORT"]) == grpc_port == Settings.grpc_port
        assert int(env["METRICS_PORT"]) == metrics_port == Settings.metrics_port
        assert env["GRPC_HOST"] == "0.0.0.0" and env["ADMIN_TOKEN_FILE"]
        assert c["resources"]["limits"] == {"cpu": "500m", "memory": "256Mi"}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == grpc_port, probe
            assert set(c[probe]) - {"grpc"} <= {
                "periodSeconds",
                "timeoutSeconds",
                "failureThreshold",
            }, probe
        assert c["readinessProbe"]["grpc"]["service"] == "xylen.v1.ModelService"
        annotations = deployments[f"model-server-{i}"]["spec"]["template"]["metadata"][
            "annotations"
        ]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == metrics_port


def test_every_container_runs_restricted_and_writes_only_to_volumes(
    objects: list[dict[str, Any]],
) -> None:
    for name, deployment in of_kind(objects, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            assert "limits" in c["resources"], (name, c["name"])
            writable = {
                m["mountPath"]: volumes[m["name"]]
                for m in c["volumeMounts"]
                if not m.get("readOnly")
            }
            for path, volume in writable.items():
                assert "emptyDir" in volume or "persistentVolumeClaim" in volume, (name, path)
            if c["name"] in ("model-server", "coordinator"):
                assert set(WRITABLE) <= set(writable) | {"/models"}, (name, sorted(writable))
        if name.startswith("model-server"):
            c = container(deployment)
            mounts = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
            assert set(WRITABLE) <= mounts, (name, mounts)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_a_headless_service_hpa_and_pdb_per_model_select_only_its_pods(
    objects: list[dict[str, Any]],
) -> None:
    deployments = of_kind(objects, "Deployment")
    services = of_kind(objects, "Service")
    hpas = of_kind(objects, "HorizontalPodAutoscaler")
    pdbs = of_kind(objects, "PodDisruptionBudget")
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for i in range(1, 5):
        name = f"model-server-{i}"
        service = services[name]["spec"]
        assert service["clusterIP"] == "None"
        grpc = next(p for p in service["ports"] if p["name"] == "grpc")
        assert grpc["port"] == port_of(container(deployments[name]), "grpc")
        chosen = [n for n, labels in pod_labels.items() if selects(service["selector"], labels)]
        assert chosen == [name]
        chosen = [
            n
            for n, labels in pod_labels.items()
            if selects(pdbs[name]["spec"]["selector"]["matchLabels"], labels)
        ]
        assert chosen == [name]
        assert pdbs[name]["spec"]["maxUnavailable"] == 1
        hpa = hpas[name]["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                         "name": name}  # fmt: skip
        assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
        assert hpa["metrics"][0]["resource"]["name"] == "cpu"
        assert deployments[name]["spec"]["replicas"] == hpa["minReplicas"]


@pytest.fixture
def coordinator_config(objects: list[dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    maps = of_kind(objects, "ConfigMap")
    name = next(n for n in maps if n.startswith("xylen-coordinator-"))
    deployment = of_kind(objects, "Deployment")["coordinator"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": name}} in volumes
    raw: dict[str, Any] = yaml.safe_load(maps[name]["data"]["coordinator.yaml"])
    return raw


def test_the_coordinator_config_is_accepted_and_dials_the_headless_services(
    objects: list[dict[str, Any]], coordinator_config: dict[str, Any], tmp_path: Path
) -> None:
    services = of_kind(objects, "Service")
    (tmp_path / "admin.token").write_text("t" * 32 + "\n")
    coordinator_config["auth"]["token_file"] = str(tmp_path / "admin.token")
    coordinator_config["feedback_queue"]["path"] = str(tmp_path / "feedback.sqlite3")
    config = parse_config(coordinator_config, source=tmp_path / "coordinator.yaml")
    compose = yaml.safe_load((ROOT / "deploy" / "coordinator.yaml").read_text())
    assert [(e.name, e.weight) for e in config.model_endpoints] == [
        (e["name"], e["weight"]) for e in compose["model_endpoints"]
    ]
    assert {k: v for k, v in coordinator_config.items() if k not in ("model_endpoints", "auth",
            "feedback_queue")} == {k: v for k, v in compose.items() if k not in (
            "model_endpoints", "auth", "feedback_queue")}  # fmt: skip
    for i, endpoint in enumerate(config.model_endpoints, start=1):
        assert endpoint.host == f"model-server-{i}"
        grpc = next(p for p in services[endpoint.host]["spec"]["ports"] if p["name"] == "grpc")
        assert endpoint.port == grpc["port"]
    c = container(of_kind(objects, "Deployment")["coordinator"])
    args = c["args"]
    assert int(args[args.index("--port") + 1]) == port_of(c, "grpc")
    assert c["readinessProbe"]["grpc"]["port"] == port_of(c, "grpc")
    assert c["resources"]["limits"] == {"cpu": "500m", "memory": "256Mi"}
    coordinator = services["coordinator"]["spec"]
    assert next(p for p in coordinator["ports"] if p["name"] == "grpc")["port"] == 50051


def env_file(path: Path) -> Iterator[tuple[str, str]]:
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            yield key, value


def test_the_servers_shared_settings_are_composes_and_known_settings(
    objects: list[dict[str, Any]],
) -> None:
    maps = of_kind(objects, "ConfigMap")
    data = next(m["data"] for n, m in maps.items() if n.startswith("xylen-server-env-"))
    assert data == dict(env_file(ROOT / "deploy" / "xylen.env"))
    known = {f.metadata["env"] for f in Settings.__dataclass_fields__.values() if f.metadata}
    deployment = of_kind(objects, "Deployment")["model-server-1"]
    assert set(data) | set(env_of(container(deployment))) <= known
    Settings.from_env({**data, **env_of(container(deployment))})  # every value parses


def test_the_servicemonitor_variant_validates_and_selects_the_services(tmp_path: Path) -> None:
    text = render(K8S / "with-servicemonitor")
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    others = [d for d in docs if d["kind"] != "ServiceMonitor"]
    assert len(monitors) == 2 and len(others) == 23
    # kubernetes-validate has no schema for a custom resource: the core objects are validated
    # strictly, the ServiceMonitors checked here against the Services they must select.
    result = validate(yaml.safe_dump_all(others), tmp_path, "--strict")
    assert result.returncode == 0 and "WARN" not in result.stdout, result.stdout + result.stderr
    services = [d for d in others if d["kind"] == "Service"]
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["namespace"] == "xylen"
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "endpoints", "targetLabels"}
        chosen = [
            s
            for s in services
            if selects(spec["selector"]["matchLabels"], s["metadata"].get("labels", {}))
        ]
        assert chosen
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval"}
            for service in chosen:
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
