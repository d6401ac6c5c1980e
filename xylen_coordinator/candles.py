"""Candle windows for the CLI and the demo: kline files turned into ``PredictInput``s."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training import features
from training.klines import load_klines
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2


def read_candles(path: Path) -> dict[str, np.ndarray]:
    """Candles of a kline file or folder, oldest first, through the training loader (checksums,
    de-duplication, anomaly policy), as the arrays the features read."""
    return features.candles_from_frame(load_klines(path).frame)


def window_input(candles: dict[str, np.ndarray], end: int, length: int) -> pb.PredictInput:
    """The ``length`` candles ending at index ``end`` as one PredictInput."""
    window = types_pb2.CandleWindow()
    for i in range(end - length + 1, end + 1):
        candle = window.candles.add(
            open=float(candles["open"][i]),
            high=float(candles["high"][i]),
            low=float(candles["low"][i]),
            close=float(candles["close"][i]),
            volume=float(candles["volume"][i]),
            quote_volume=float(candles["quote_volume"][i]),
            trade_count=int(candles["trades"][i]),
            taker_buy_base_volume=float(candles["taker_buy_base_volume"][i]),
        )
        candle.open_time.FromMilliseconds(int(candles["open_time"][i]))
    return pb.PredictInput(candles=window)
