"""Fixtures for the training tests: generated kline files and the real Binance Vision samples."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from training.generator import generate

#: Real Binance Vision files (see their README); never copied into the repo.
REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared/data/binance-vision"


def _real_file(relative: str) -> Path:
    path = REAL_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    return path


@pytest.fixture
def real_file() -> Callable[[str], Path]:
    """``real_file("jamado95__whatever/X.csv")``: the path, or a clean skip when absent."""
    return _real_file


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six monthly 1h zips (2023-01..2023-06, ~4.3k candles) with CHECKSUMs."""
    out = tmp_path_factory.mktemp("klines")
    generate(out, start="2023-01", end="2023-06", seed=11)
    return out
