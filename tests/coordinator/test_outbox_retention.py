"""The coordinator's outbox keeps its rows for ``feedback_queue.retention_seconds``: the
setting, its default and its validation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from coordinator.helpers import endpoint

from xylen_coordinator.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[2]
DAY = 86400.0
WEEK = 7 * DAY


def test_retention_defaults_to_a_week_and_bad_values_name_the_key() -> None:
    raw: dict[str, Any] = {"model_endpoints": [endpoint("m1", 8001, 1.0)]}
    assert parse_config(raw).feedback_queue.retention_seconds == WEEK
    for good in (3600, 86400.5, 30 * DAY):
        raw["feedback_queue"] = {"retention_seconds": good}
        assert parse_config(raw).feedback_queue.retention_seconds == good
    for bad in (7, 0, -WEEK, "7d", float("nan"), True):
        raw["feedback_queue"] = {"retention_seconds": bad}
        with pytest.raises(ConfigError) as info:
            parse_config(raw)
        assert str(info.value).startswith("feedback_queue.retention_seconds: "), info.value
    # Both example configurations state it, and load.
    for example in (REPO / "config.example.yaml", REPO / "deploy" / "coordinator.yaml"):
        assert re.search(r"^  retention_seconds: 604800\b", example.read_text(), re.M), example
        raw = yaml.safe_load(example.read_text())
        raw.pop("auth", None)  # the deployed stack's token file exists in its container only
        assert parse_config(raw).feedback_queue.retention_seconds == WEEK
