"""Fixtures of the event loop's predictor tests (``test_loop_batch``, ``test_lone_request``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import server_settings

from xylen_server.serving.model_store import LoadedModel, load_model


@pytest.fixture(scope="module")
def model(models_root: Path) -> Iterator[LoadedModel]:
    """The trained LightGBM model, loaded with real onnxruntime sessions."""
    loaded = load_model(server_settings(models_root))
    # Every request of these tests fits the loop, whatever this machine measured at warm-up.
    yield dataclasses.replace(loaded, loop_max_rows=8)
    loaded.close()
