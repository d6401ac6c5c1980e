"""Dockerfile and compose.yaml, kept honest without a container engine: hadolint, the compose
spec schema, Debian's ``docker-compose config`` (which also catches wrong value types), and the
compose services against the coordinator's config.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xylen_coordinator.config import load_config
from xylen_server.devtools.stack import load_compose, mismatches, model_services

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "compose.yaml"
COORDINATOR = ROOT / "deploy" / "coordinator.yaml"


def test_the_dockerfile_is_hadolint_clean() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_is_multi_stage_non_root_with_a_grpc_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and all("-slim" in line for line in stages), stages
    assert "COPY --from=build /opt/xylen /opt/xylen" in text
    user = [line for line in text.splitlines() if line.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("0", "root")), user
    assert 'CMD ["python", "-m", "xylen_server.probe"]' in text
    for setting in (
        "MODEL_NAME=model_1",
        "MODEL_PATH=/models",
        "ONNX_ENABLED=true",
        "LOG_LEVEL=INFO",
    ):
        assert setting in text, setting
    assert 'VOLUME ["/models", "/data"]' in text


def test_compose_yaml_validates_against_the_compose_spec() -> None:
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_spec_check_catches_a_broken_file(tmp_path: Path) -> None:
    broken = load_compose(COMPOSE)
    broken["services"]["coordinator"]["depends_on"] = {"model-server-1": {"condition": "sometime"}}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stdout


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian docker-compose absent")
def test_docker_compose_config_accepts_it() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian docker-compose absent")
def test_docker_compose_config_catches_a_wrong_type(tmp_path: Path) -> None:
    broken = load_compose(COMPOSE)
    broken["services"]["model-server-1"]["ports"] = {"grpc": 8001}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run(
        ["docker-compose", "-f", str(path), "config", "-q"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "ports" in result.stdout + result.stderr


def test_four_servers_on_8001_to_8004_defined_once_with_the_seed_limits() -> None:
    compose = load_compose(COMPOSE)
    services = model_services(compose)
    assert {n: e["GRPC_PORT"] for n, e in services.items()} == {
        f"model-server-{i}": f"800{i}" for i in range(1, 5)
    }
    assert [e["MODEL_NAME"] for e in services.values()] == [f"model_{i}" for i in range(1, 5)]
    text = COMPOSE.read_text()
    assert text.count("build:") == 1 and text.count("<<: *model-server") == 5
    for name in [*services, "coordinator"]:
        service = compose["services"][name]
        assert service["deploy"]["resources"]["limits"] == {"cpus": "0.5", "memory": "256M"}
        assert service["read_only"] is True and service["healthcheck"]["test"][:3] == [
            "CMD",
            "python",
            "-m",
        ]
        assert service["secrets"] == ["admin_token"]
        assert all(p.startswith("127.0.0.1:") for p in service["ports"]), service["ports"]
    data_volumes = [compose["services"][n]["volumes"][1].split(":")[0] for n in services]
    assert len(set(data_volumes)) == 4
    depends = compose["services"]["coordinator"]["depends_on"]
    assert depends == {name: {"condition": "service_healthy"} for name in services}


def test_compose_services_and_the_coordinator_config_name_the_same_servers(tmp_path: Path) -> None:
    compose = load_compose(COMPOSE)
    with open(COORDINATOR) as f:
        config = yaml.safe_load(f)
    assert mismatches(compose, config) == []
    # and the coordinator accepts the file as deployed (the secret's path moved here, since
    # the token file is read when the config is)
    assert config["auth"]["token_file"] == "/run/secrets/admin_token"
    (tmp_path / "admin.token").write_text("t0ken\n")
    config["auth"]["token_file"] = str(tmp_path / "admin.token")
    (tmp_path / "coordinator.yaml").write_text(yaml.safe_dump(config))
    loaded = load_config(tmp_path / "coordinator.yaml")
    assert [(e.name, e.host, e.port) for e in loaded.model_endpoints] == [
        (f"model_{i}", f"model-server-{i}", 8000 + i) for i in range(1, 5)
    ]


def test_a_fifth_server_in_compose_alone_is_a_mismatch() -> None:
    compose = load_compose(COMPOSE)
    with open(COORDINATOR) as f:
        config = yaml.safe_load(f)
    five = copy.deepcopy(compose)
    block = copy.deepcopy(five["services"]["model-server-4"])
    block["environment"].update(MODEL_NAME="model_5", GRPC_PORT="8005")
    five["services"]["model-server-5"] = block
    assert mismatches(five, config) == [
        "compose service model-server-5 is not a coordinator endpoint"
    ]
    config["model_endpoints"].append(
        {"name": "model_5", "host": "model-server-5", "port": 8005, "weight": 0.1}
    )
    assert mismatches(five, config) == []
    config["model_endpoints"][-1]["port"] = 8006
    assert mismatches(five, config) == [
        "endpoint model_5: model-server-5 listens on GRPC_PORT=8005"
    ]
