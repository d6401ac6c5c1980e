"""config.yaml validation: every bad value names its key; the example file loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from xylen_coordinator.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def base() -> dict[str, Any]:
    return {
        "model_endpoints": [
            {"name": "model_1", "host": "127.0.0.1", "port": 8001, "weight": 0.6},
            {"name": "model_2", "host": "127.0.0.1", "port": 8002, "weight": 0.4},
        ]
    }


def test_example_config_loads() -> None:
    config = load_config(REPO / "config.example.yaml")
    assert [e.name for e in config.model_endpoints] == ["model_1", "model_2", "model_3", "model_4"]
    assert [e.port for e in config.model_endpoints] == [8001, 8002, 8003, 8004]
    assert len({e.weight for e in config.model_endpoints}) == 4
    assert config.retraining.send_feedback_to_models is True
    assert config.feedback_queue.path == REPO / "run/coordinator/feedback.sqlite3"


def test_defaults_fill_in() -> None:
    config = parse_config(base())
    assert config.deadline_ms == 500
    assert config.thresholds.buy == 0.55 and config.thresholds.sell == 0.45
    assert config.weights.mode == "static"
    assert config.endpoint("model_2") is not None
    assert config.endpoint("model_2").address == "127.0.0.1:8002"  # type: ignore[union-attr]


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.replace("[", ".").replace("]", "").split(".")
    node: Any = raw
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


@pytest.mark.parametrize(
    ("dotted", "value", "key_in_message"),
    [
        ("colour", "blue", "colour: unknown key"),
        ("model_endpoints[0].wieght", 1, "model_endpoints[0].wieght: unknown key"),
        ("model_endpoints[1].name", "model_1", "model_endpoints[1].name: duplicate name"),
        ("model_endpoints[0].weight", -0.1, "model_endpoints[0].weight: must not be negative"),
        ("model_endpoints[0].weight", "heavy", "model_endpoints[0].weight: must be a finite"),
        ("model_endpoints[0].weight", 1e308, "model_endpoints[0].weight: must be at most 1e+06"),
        ("model_endpoints[0].port", 0, "model_endpoints[0].port"),
        ("model_endpoints[0].port", 70000, "model_endpoints[0].port"),
        ("model_endpoints[0].port", "8001", "model_endpoints[0].port"),
        ("model_endpoints[0].port", True, "model_endpoints[0].port"),
        ("model_endpoints[1].port", 8001, "model_endpoints[1].port: 127.0.0.1:8001 is already"),
        ("model_endpoints[0].host", "", "model_endpoints[0].host"),
        ("model_endpoints[0].enabled", "yes", "model_endpoints[0].enabled"),
        ("model_endpoints", [], "model_endpoints: must be a non-empty list"),
        ("deadline_ms", 0, "deadline_ms: must be > 0"),
        ("deadline_ms", 1e22, "deadline_ms: must be > 0 and at most 3.6e+06"),
        ("quorum.min_weight_fraction", 1.5, "quorum.min_weight_fraction"),
        ("quorum.min_votes", 3, "quorum.min_votes: must be in 1..2"),
        ("thresholds.buy", 0.4, "thresholds: need 0 <= sell < buy <= 1"),
        ("thresholds.source", "median", "thresholds.source: must be one of members, fixed"),
        ("weights.mode", "magic", "weights.mode"),
        ("weights.adaptive.floor", 0, "weights.adaptive.floor"),
        ("weights.adaptive.cap", 0.1, "weights.adaptive.cap"),
        ("weights.adaptive.cap", 1e7, "weights.adaptive.cap: must be at most 1e+06"),
        ("weights.adaptive.min_outcomes", 1000, "weights.adaptive.min_outcomes"),
        ("retraining.feedback_delay_seconds", -1, "retraining.feedback_delay_seconds"),
        ("retraining.send_feedback", True, "retraining.send_feedback: unknown key"),
        ("transport.keepalive_time_ms", 1000, "transport.keepalive_time_ms"),
        ("tls.enabled", True, "tls.ca_file: required when tls.enabled"),
        ("tls.enabled", "yes", "tls.enabled: must be true or false"),
        ("feedback_queue.retry_initial_seconds", 0, "feedback_queue.retry_initial_seconds"),
    ],
)
def test_bad_values_name_their_key(dotted: str, value: Any, key_in_message: str) -> None:
    raw = base()
    _set(raw, dotted, value)
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert key_in_message in str(info.value)


def test_all_zero_weights_refused() -> None:
    raw = base()
    for e in raw["model_endpoints"]:
        e["weight"] = 0
    with pytest.raises(ConfigError, match="model_endpoints: the weights of the enabled"):
        parse_config(raw)


def test_no_enabled_endpoint_refused() -> None:
    raw = base()
    for e in raw["model_endpoints"]:
        e["enabled"] = False
    with pytest.raises(ConfigError, match="no endpoint is enabled"):
        parse_config(raw)


def test_disabled_zero_weight_does_not_count() -> None:
    raw = base()
    raw["model_endpoints"][1].update(weight=0, enabled=False)
    config = parse_config(raw)
    assert [e.name for e in config.enabled_endpoints] == ["model_1"]


def test_missing_required_key() -> None:
    raw = base()
    del raw["model_endpoints"][1]["port"]
    with pytest.raises(ConfigError, match=r"model_endpoints\[1\]\.port: required"):
        parse_config(raw)
    with pytest.raises(ConfigError, match="model_endpoints: required"):
        parse_config({"deadline_ms": 100})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model_endpoints: [\n  {name: a, port: 1", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("", "must be a mapping"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_relative_queue_path_is_relative_to_the_file(tmp_path: Path) -> None:
    raw = base()
    raw["feedback_queue"] = {"path": "state/q.sqlite3"}
    path = tmp_path / "conf" / "config.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).feedback_queue.path == path.parent.resolve() / "state/q.sqlite3"
