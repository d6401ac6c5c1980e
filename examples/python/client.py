"""The Python client library in one page: one model server with ``ModelClient``, then the
ensemble of all of them with ``Coordinator`` (in-process fan-out, no coordinator server).

    make up                                   # four servers on 8001-8004 (or make demo's)
    .venv/bin/python examples/python/client.py --config config.example.yaml \\
        --candles data/default/BTCUSDT-1h-2024-12.zip

--server picks the single server (default: the config's first endpoint).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xylen.v1 import types_pb2
from xylen_coordinator import Coordinator, ModelCallError, ModelClient, load_config
from xylen_coordinator.candles import read_candles
from xylen_server.candles import window_input


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config.example.yaml"))
    parser.add_argument("--candles", type=Path, required=True, help="Binance Vision klines")
    parser.add_argument("--server", help="host:port of one model server")
    args = parser.parse_args()

    config = load_config(args.config)
    first = next(e for e in config.model_endpoints if e.enabled)
    candles = read_candles(args.candles)

    # One server: its model, a prediction from the latest candle window, a refused call.
    with ModelClient(args.server or f"{first.host}:{first.port}") as model:
        info = model.info()
        latest = window_input(candles, len(candles["close"]) - 1, info.lookback)
        (prediction,) = model.predict([latest])
        print(
            f"{info.name} v{info.version}: p_up={prediction.probability_up:.4f} "
            f"signal={types_pb2.Signal.Name(prediction.signal)} id={prediction.prediction_id}"
        )
        try:
            model.predict([[1.0, 2.0]])
        except ModelCallError as error:
            print(f"refused as expected: {error.code.name} {error.reason}")

    # The ensemble: every configured server asked at once, one weighted decision.
    with Coordinator(config) as coordinator:
        result = coordinator.predict([latest])
        decision = result.rows[0]
        votes = ", ".join(f"{v.server_name}={v.probability:.3f}" for v in decision.votes)
        print(f"ensemble: {decision.signal.name} p_up={decision.probability:.4f} ({votes})")
        for missing in result.missing:
            print(f"  missing {missing.server_name}: {missing.reason.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
