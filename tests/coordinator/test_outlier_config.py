"""The outlier_detection section and an endpoint's model_name: defaults, the example file, and
every bad value refused with its dotted key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from xylen_coordinator.config import ConfigError, OutlierDetection, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def base(**sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model_endpoints": [
            {"name": "model_1", "host": "127.0.0.1", "port": 8001},
            {"name": "model_2", "host": "127.0.0.1", "port": 8002},
        ]
    }
    raw.update(sections)
    return raw


def test_defaults_and_the_example_file() -> None:
    config = parse_config(base())
    assert config.outlier_detection == OutlierDetection()
    assert config.outlier_detection.enabled and config.outlier_detection.consecutive_failures == 3
    assert [e.model_name for e in config.model_endpoints] == ["", ""]
    example = load_config(REPO / "config.example.yaml")
    assert example.outlier_detection == OutlierDetection()
    raw = base(outlier_detection={"enabled": False, "base_ejection_seconds": 0.25})
    raw["model_endpoints"][0]["model_name"] = "model_1"
    config = parse_config(raw)
    assert not config.outlier_detection.enabled
    assert config.outlier_detection.base_ejection_seconds == 0.25
    assert config.model_endpoints[0].model_name == "model_1"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"colour": 1}, "outlier_detection.colour: unknown key"),
        ({"enabled": "yes"}, "outlier_detection.enabled: must be true or false"),
        ({"consecutive_failures": 0}, "outlier_detection.consecutive_failures: must be >= 1"),
        ({"consecutive_failures": 1.5}, "outlier_detection.consecutive_failures: must be an"),
        ({"base_ejection_seconds": 0}, "outlier_detection.base_ejection_seconds: must be > 0"),
        ({"max_ejection_seconds": 1}, "outlier_detection.max_ejection_seconds: must be >="),
        ({"probe_timeout_ms": 0}, "outlier_detection.probe_timeout_ms: must be >= 1"),
        ({"max_ejected_fraction": 0}, "outlier_detection.max_ejected_fraction: must be in"),
        ({"max_ejected_fraction": 1.5}, "outlier_detection.max_ejected_fraction: must be in"),
    ],
)
def test_bad_outlier_detection_is_refused_naming_the_key(
    section: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(base(outlier_detection=section))
    assert str(info.value).startswith(message)


def test_bad_model_name_is_refused() -> None:
    for value, message in ((7, "must be a string"), ("m" * 300, "at most 256")):
        raw = base()
        raw["model_endpoints"][1]["model_name"] = value
        with pytest.raises(ConfigError) as info:
            parse_config(raw)
        assert str(info.value).startswith("model_endpoints[1].model_name: ")
        assert message in str(info.value)
