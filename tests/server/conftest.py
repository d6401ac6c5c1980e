"""Fixtures shared by the model-server tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import write_model
from learning_helpers import add_version


@pytest.fixture
def two_versions(tmp_path: Path, candles) -> Path:
    """A model root whose model_1 serves v1 (30 trees) and keeps a v2 to swap to."""
    models = tmp_path / "models"
    write_model(models, "model_1", "lightgbm", candles, trees=30)
    add_version(models, 2, seed=2)
    return tmp_path
