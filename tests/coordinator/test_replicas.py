"""Replicas of one model behind one endpoint: real servers on loopback, one vote per model.

model_1 runs twice (two real server processes, each with its own copy of the model), model_2
once. The coordinator spreads model_1's requests over both replicas (each server's own
``xylen_predict_rows_total`` counts them), keeps model_1's vote when one replica is killed with
SIGKILL mid-traffic or hangs (SIGSTOP: that replica is ejected, not the model), takes a
restarted replica back, and resolves a host name into its addresses.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import harness
import numpy as np
import pytest
from coordinator.helpers import write_config
from grpc_health.v1 import health_pb2
from metrics_page import scrape, value

from xylen_coordinator import AsyncCoordinator
from xylen_coordinator.config import ConfigError, parse_config
from xylen_coordinator.replicas import resolve

SERVING = health_pb2.HealthCheckResponse.SERVING


def rows_answered(server: harness.ServerProcess, host: str = "127.0.0.1") -> int:
    """Rows the server answered by Predict and PredictStream, from its own /metrics."""
    samples = scrape(f"http://{host}:{server.metrics_port}/metrics", timeout=5)
    return int(value(samples, "xylen_predict_rows_total"))


def free_port(*hosts: str) -> int:
    """A port free on 127.0.0.1 and on each of ``hosts``."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        try:
            for host in hosts:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port


def wait_serving(address: str, server: harness.ServerProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        while True:
            try:
                if harness.health_status(channel, timeout=1.0) == SERVING:
                    return
            except grpc.RpcError:
                pass
            assert server.proc.poll() is None, server.log()
            assert time.monotonic() < deadline, f"{address} not SERVING:\n{server.log()}"
            time.sleep(0.1)


def start_replica(root: Path, port: int = 0) -> harness.ServerProcess:
    env = {"FEEDBACK_DATA_DIR": str(root / "data"), "SHUTDOWN_GRACE_SECONDS": "1"}
    if port:
        env["GRPC_PORT"] = str(port)
    return harness.start_server(root, "model_1", env=env, wait=False)


@pytest.fixture
def replicas(fleet_models: Path, tmp_path: Path) -> Iterator[list[harness.ServerProcess]]:
    """Two servers of model_1, each with its own copy of the model and its own data."""
    servers: list[harness.ServerProcess] = []
    try:
        for i in range(2):
            root = tmp_path / f"replica-{i}"
            shutil.copytree(fleet_models / "model_1", root / "model_1")
            servers.append(start_replica(root))
        for server in servers:
            server.wait_serving()
        yield servers
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)
            server.stop()


def config_for(
    tmp_path: Path, replicas: list[harness.ServerProcess], model_2: harness.ServerProcess, **kw: Any
) -> Path:
    endpoints = [
        {
            "name": "model_1",
            "host": "127.0.0.1",
            "port": replicas[0].port,
            "weight": 0.5,
            "replicas": [server.address for server in replicas],
        },
        {"name": "model_2", "host": "127.0.0.1", "port": model_2.port, "weight": 0.5},
    ]
    return write_config(tmp_path / "config.yaml", endpoints, **kw)


def one_vote_each(result: Any) -> list[str]:
    names = [vote.server_name for vote in result.rows[0].votes]
    assert len(names) == len(set(names)), names  # never two votes of one model
    return names


def test_one_vote_per_model_spread_over_its_replicas(
    replicas: list[harness.ServerProcess],
    four_servers: list[harness.ServerProcess],
    feature_rows: np.ndarray,
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, replicas, four_servers[1])
    inputs = [harness.feature_input(feature_rows[7])]

    async def scenario() -> list[list[str]]:
        async with AsyncCoordinator(config) as coordinator:
            assert await coordinator.wait_serving(timeout=30)  # model_1: a replica serves
            deadline = asyncio.get_running_loop().time() + 30
            while (detail := coordinator.endpoints()[0].health_detail) != "2 of 2 replicas SERVING":
                assert asyncio.get_running_loop().time() < deadline, detail
                await asyncio.sleep(0.05)
            return [one_vote_each(await coordinator.predict(inputs)) for _ in range(40)]

    before = [rows_answered(s) for s in replicas]
    voters = asyncio.run(scenario())
    spread = [rows_answered(s) - b for s, b in zip(replicas, before, strict=True)]
    print(f"coordinator replicas: 40 predictions -> model_1 rows per replica {spread}")
    assert all(sorted(v) == ["model_1", "model_2"] for v in voters)
    assert sum(spread) == 40  # one vote per model: each request went to exactly one replica
    assert min(spread) >= 15, spread  # round robin


def test_a_killed_replica_costs_no_vote_and_a_restarted_one_comes_back(
    replicas: list[harness.ServerProcess],
    four_servers: list[harness.ServerProcess],
    feature_rows: np.ndarray,
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, replicas, four_servers[1])
    inputs = [harness.feature_input(feature_rows[11])]
    victim, survivor = replicas

    async def scenario() -> tuple[list[list[str]], list[int], list[int]]:
        async with AsyncCoordinator(config) as coordinator:
            assert await coordinator.wait_serving(timeout=30)
            while "2 of 2" not in coordinator.endpoints()[0].health_detail:
                await asyncio.sleep(0.05)
            voters: list[list[str]] = []
            stop = asyncio.Event()

            async def traffic() -> None:
                while not stop.is_set():
                    voters.append(one_vote_each(await coordinator.predict(inputs)))

            clients = [asyncio.create_task(traffic()) for _ in range(4)]
            await asyncio.sleep(0.5)
            victim.proc.send_signal(signal.SIGKILL)  # mid-traffic
            assert await asyncio.to_thread(victim.proc.wait, 10) == -signal.SIGKILL
            await asyncio.sleep(1.5)
            after_kill = rows_answered(survivor)
            await asyncio.sleep(0.5)
            moved = [0, rows_answered(survivor) - after_kill]
            # The same port again: the replica's channel reconnects and its health turns SERVING.
            replicas[0] = await asyncio.to_thread(
                start_replica, Path(victim.log_path).parent, victim.port
            )
            await asyncio.to_thread(replicas[0].wait_serving)
            deadline = asyncio.get_running_loop().time() + 30
            while "2 of 2" not in coordinator.endpoints()[0].health_detail:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
            back = [rows_answered(replicas[0]), rows_answered(survivor)]
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*clients)
            back = [rows_answered(replicas[0]) - back[0], rows_answered(survivor) - back[1]]
            return voters, moved, back

    voters, moved, back = asyncio.run(scenario())
    lost = sum(1 for v in voters if "model_1" not in v)
    print(
        f"coordinator replicas: {len(voters)} predictions while one replica was killed and "
        f"restarted: model_1 missing {lost}; after the kill the survivor took {moved[1]} rows; "
        f"after the restart per replica {back}"
    )
    assert len(voters) > 20
    assert lost == 0
    assert all("model_2" in v for v in voters)
    assert moved[1] > 0
    assert min(back) > 0, back  # the restarted replica takes its share again


def test_a_hung_replica_is_ejected_not_the_model(
    replicas: list[harness.ServerProcess],
    four_servers: list[harness.ServerProcess],
    feature_rows: np.ndarray,
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, replicas, four_servers[1], deadline_ms=1000)
    inputs = [harness.feature_input(feature_rows[3])]
    hung = replicas[0]

    async def scenario() -> tuple[int, int, list[list[str]], bool]:
        async with AsyncCoordinator(config) as coordinator:
            assert await coordinator.wait_serving(timeout=30)
            replica_set = coordinator._current_clients()["model_1"]
            while not all(r.serving for r in replica_set.replicas.values()):
                await asyncio.sleep(0.05)
            hung.proc.send_signal(signal.SIGSTOP)
            lost = calls = 0
            while not replica_set.replicas[hung.address].breaker.ejected:
                assert calls < 30, "the hung replica was never ejected"
                result = await coordinator.predict(inputs)
                calls += 1
                lost += "model_1" not in one_vote_each(result)
            model_ejected = replica_set.breaker.ejected
            after = [one_vote_each(await coordinator.predict(inputs)) for _ in range(20)]
            hung.proc.send_signal(signal.SIGCONT)
            return lost, calls, after, model_ejected

    lost, calls, after, model_ejected = asyncio.run(scenario())
    print(
        f"coordinator replicas: a hung replica cost {lost} of {calls} votes until it was "
        f"ejected; then {sum('model_1' in v for v in after)}/20"
    )
    assert not model_ejected
    # Consecutive timeouts eject it (3); its calls alternate with the healthy replica's.
    assert 1 <= lost <= calls // 2 + 1
    assert all("model_1" in v for v in after)


def test_replicas_on_one_port_of_two_loopback_addresses(
    fleet_models: Path,
    four_servers: list[harness.ServerProcess],
    feature_rows: np.ndarray,
    tmp_path: Path,
) -> None:
    """A headless Service's shape: the same port on several addresses (127.0.0.1 and
    127.0.0.2, both loopback; the server does not bind GRPC_HOST=::1 yet)."""
    port = free_port("127.0.0.2")
    servers: list[tuple[harness.ServerProcess, str]] = []
    try:
        for host in ("127.0.0.1", "127.0.0.2"):
            root = tmp_path / f"replica-{len(servers)}"
            shutil.copytree(fleet_models / "model_1", root / "model_1")
            data = str(root / "data")
            env = {"GRPC_HOST": host, "GRPC_PORT": str(port), "FEEDBACK_DATA_DIR": data}
            server = harness.start_server(root, "model_1", env=env, wait=False)
            servers.append((server, f"[{host}]" if ":" in host else host))
        addresses = [f"{shown}:{port}" for _, shown in servers]
        for (server, _), address in zip(servers, addresses, strict=True):
            wait_serving(address, server)  # ServerProcess.wait_serving dials 127.0.0.1 only
        endpoints = [
            {"name": "model_1", "host": "localhost", "port": port, "replicas": addresses},
            {"name": "model_2", "host": "127.0.0.1", "port": four_servers[1].port},
        ]
        config = write_config(tmp_path / "config.yaml", endpoints)
        inputs = [harness.feature_input(feature_rows[5])]

        async def scenario() -> list[list[str]]:
            async with AsyncCoordinator(config) as coordinator:
                assert await coordinator.wait_serving(timeout=60)
                deadline = asyncio.get_running_loop().time() + 60
                while "2 of 2" not in coordinator.endpoints()[0].health_detail:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.05)
                return [one_vote_each(await coordinator.predict(inputs)) for _ in range(20)]

        voters = asyncio.run(scenario())
        spread = [rows_answered(server, shown) for server, shown in servers]
    finally:
        for server, _ in servers:
            server.stop()
    print(f"coordinator replicas: {addresses} -> model_1 rows per replica {spread}")
    assert all(sorted(v) == ["model_1", "model_2"] for v in voters)
    assert sum(spread) == 20 and min(spread) >= 5, spread


def test_a_host_name_resolves_to_its_replicas(
    four_servers: list[harness.ServerProcess], feature_rows: np.ndarray, tmp_path: Path
) -> None:
    server = four_servers[0]
    expected = []
    for *_, sockaddr in socket.getaddrinfo("localhost", server.port, type=socket.SOCK_STREAM):
        host = str(sockaddr[0])
        address = f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"
        if address not in expected:
            expected.append(address)
    endpoints = [{"name": "model_1", "host": "localhost", "port": server.port, "weight": 1.0}]
    config = write_config(tmp_path / "config.yaml", endpoints)

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        resolved = await resolve("localhost", server.port)
        async with AsyncCoordinator(config) as coordinator:
            assert await coordinator.wait_serving(timeout=30)
            result = await coordinator.predict([harness.feature_input(feature_rows[0])])
            dialled = list(coordinator._current_clients()["model_1"].replicas)
            return resolved, dialled, [v.server_name for v in result.rows[0].votes]

    resolved, dialled, voters = asyncio.run(scenario())
    assert resolved == expected and dialled == expected
    assert "127.0.0.1:" + str(server.port) in dialled
    assert voters == ["model_1"]


@pytest.mark.parametrize(
    ("replicas", "message"),
    [
        ("127.0.0.1:8001", "model_endpoints[0].replicas: must be a list"),
        (["127.0.0.1"], "model_endpoints[0].replicas[0]: must be host:port"),
        (["::1:8001"], "model_endpoints[0].replicas[0]: must be host:port"),
        (["127.0.0.1:70000"], "model_endpoints[0].replicas[0]: must be host:port"),
        (["127.0.0.1:8001", "127.0.0.1:8001"], "model_endpoints[0].replicas[1]: 127.0.0.1:8001"),
        ([f"127.0.0.1:{8000 + i}" for i in range(65)], "at most 64"),
    ],
)
def test_bad_replica_lists_name_their_key(replicas: Any, message: str) -> None:
    raw = {
        "model_endpoints": [
            {"name": "model_1", "host": "localhost", "port": 8001, "replicas": replicas}
        ]
    }
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    assert message in str(error.value)
    assert len(str(error.value)) < 300


def test_a_replica_list_with_ipv6_parses() -> None:
    raw = {
        "model_endpoints": [
            {
                "name": "model_1",
                "host": "localhost",
                "port": 8001,
                "replicas": ["127.0.0.1:8001", "[::1]:8001"],
            }
        ],
        "transport": {"resolve_interval_seconds": 5},
    }
    config = parse_config(raw)
    assert config.model_endpoints[0].replicas == ("127.0.0.1:8001", "[::1]:8001")
    assert config.transport.resolve_interval_seconds == 5
    with pytest.raises(ConfigError, match=r"transport\.resolve_interval_seconds: must be > 0"):
        parse_config({**raw, "transport": {"resolve_interval_seconds": 0}})
