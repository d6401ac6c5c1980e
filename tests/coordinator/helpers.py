"""Helpers shared by the coordinator tests: the default servers' names and weights, free
ports, and config files with fast test settings."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import harness
import yaml

from training.metadata import ModelMetadata

#: Model types and static weights of the four default servers.
MODELS = (
    ("model_1", "lightgbm", 0.4),
    ("model_2", "xgboost", 0.3),
    ("model_3", "catboost", 0.2),
    ("model_4", "lightgbm", 0.1),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def endpoint(name: str, port: int, weight: float, enabled: bool = True) -> dict[str, Any]:
    return {"name": name, "host": "127.0.0.1", "port": port, "weight": weight, "enabled": enabled}


def write_config(
    path: Path,
    endpoints: Sequence[Mapping[str, Any]],
    **sections: Any,
) -> Path:
    """A config.yaml with ``endpoints`` and fast test defaults, ``sections`` overriding."""
    raw: dict[str, Any] = {
        "model_endpoints": [dict(e) for e in endpoints],
        "deadline_ms": 3000,
        "feedback_queue": {
            "path": str(path.parent / "feedback.sqlite3"),
            "retry_initial_seconds": 0.2,
            "retry_max_seconds": 1.0,
        },
        "transport": {"reconnect_backoff_initial_ms": 50, "reconnect_backoff_max_ms": 500},
    }
    raw.update(sections)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def four_endpoints(servers: Sequence[harness.ServerProcess]) -> list[dict[str, Any]]:
    return [
        endpoint(name, server.port, weight)
        for (name, _, weight), server in zip(MODELS, servers, strict=True)
    ]


def write_model_with(root: Path, name: str, seed: int, **changes: object) -> None:
    """A small real model ``root/name`` (20 trees) whose metadata differs by ``changes``
    (horizon, fee, thresholds...): servers of different label definitions side by side."""
    harness.write_model(root, name, trees=20, seed=seed)
    meta = ModelMetadata.read(root / name)
    dataclasses.replace(meta, **changes).write(root / name)  # type: ignore[arg-type]
