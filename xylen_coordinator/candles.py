"""Kline files read into candle columns, for the CLI and the demo (imported only by them: the
loader needs polars)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training import features
from training.klines import load_klines


def read_candles(path: Path) -> dict[str, np.ndarray]:
    """Candles of a kline file or folder, oldest first, through the training loader (checksums,
    de-duplication, anomaly policy), as the arrays the features read."""
    return features.candles_from_frame(load_klines(path).frame)
