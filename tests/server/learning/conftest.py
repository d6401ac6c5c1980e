"""Fixtures the learning tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from learning_helpers import CLOCK_START

from xylen_server import clock


@pytest.fixture
def clock_file(tmp_path: Path) -> Iterator[Path]:
    """The log's clock read from a real file (``CLOCK_FILE``) holding :data:`CLOCK_START` ms;
    the wall clock again after the test."""
    path = tmp_path / "clock"
    path.write_text(str(CLOCK_START))
    clock.use_file(path)
    try:
        yield path
    finally:
        clock.use_file(None)
