"""``xylen-coordinator``: serve the EnsembleService, or make one ensemble prediction.

xylen-coordinator serve --config config.yaml [--port 50051] [--watch 2]
xylen-coordinator predict --config config.yaml --candles BTCUSDT-1h-2024-01.zip [--rows 3]
xylen-coordinator replay [--data data/default] [--models models] [...]   (python -m backtest)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from xylen_coordinator.config import ConfigError, load_config
from xylen_coordinator.coordinator import AsyncCoordinator
from xylen_coordinator.report import format_result
from xylen_server.clock import ClockError
from xylen_server.errors import SettingsError, XylenError

#: Candles sent per window when no server reports its lookback.
_DEFAULT_LOOKBACK = 100


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xylen-coordinator",
        description="Weighted ensemble over xylen model servers.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve xylen.v1.EnsembleService over gRPC")
    serve.add_argument("--config", type=Path, required=True, help="config.yaml")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default loopback; TLS and credentials come from the environment: "
        "TLS_CERT_FILE, TLS_KEY_FILE, TLS_CLIENT_CA_FILE, ADMIN_TOKEN(_FILE), ADMIN_IDENTITIES, "
        "PREDICT_TOKEN(_FILE), ALLOW_INSECURE_ADMIN, as for xylen-server)",
    )
    serve.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one")
    serve.add_argument(
        "--watch",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also reload when the config file changes, checked every SECONDS (0: SIGHUP only)",
    )
    serve.add_argument(
        "--grace", type=float, default=5.0, help="seconds in-flight calls get after SIGTERM"
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="HTTP port of /metrics and /health on --host (default 9000, or a free one when "
        "--port is 0; -1: no metrics)",
    )
    predict = commands.add_parser("predict", help="one ensemble decision on the latest candles")
    predict.add_argument("--config", type=Path, required=True, help="config.yaml")
    predict.add_argument(
        "--candles", type=Path, required=True, help="Binance Vision kline CSV or zip"
    )
    predict.add_argument("--rows", type=int, default=1, help="predict the last N candles")
    predict.add_argument("--timeout-ms", type=float, default=0.0, help="fan-out deadline")
    commands.add_parser(
        "replay",
        help="walk-forward replay of servers and coordinator over historical candles "
        "(python -m backtest --help for its options)",
        add_help=False,
    )
    return parser


async def _predict(args: argparse.Namespace) -> int:
    from xylen_coordinator.candles import read_candles
    from xylen_server.candles import window_input

    candles = read_candles(args.candles)
    async with AsyncCoordinator(args.config) as coordinator:
        infos = await coordinator.model_infos()
        lookback = max((i.lookback for i in infos.values()), default=_DEFAULT_LOOKBACK)
        total = len(candles["close"])
        rows = max(1, args.rows)
        if total < lookback + rows - 1:
            print(
                f"xylen-coordinator: error: {args.candles} has {total} candles; "
                f"{rows} window(s) of {lookback} need {lookback + rows - 1}",
                file=sys.stderr,
            )
            return 2
        ends = list(range(total - rows, total))
        inputs = [window_input(candles, end, lookback) for end in ends]
        timeout = args.timeout_ms / 1000 if args.timeout_ms > 0 else None
        try:
            result = await coordinator.predict(inputs, timeout)
        except XylenError as exc:
            print(
                f"xylen-coordinator: {exc.code.name} {exc.reason}: {exc.message}", file=sys.stderr
            )
            return 1
        print(format_result(result, [int(candles["open_time"][e]) for e in ends]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["replay"]:
        # The replay starts its own servers and coordinator (backtest, beside this package).
        from backtest.__main__ import main as replay

        return replay(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "serve":
            from xylen_coordinator.server import serve
            from xylen_server import clock
            from xylen_server.settings import Settings
            from xylen_server.telemetry import configure_tracing

            security = Settings.from_env()
            clock.use_file(security.clock_file)
            configure_tracing("xylen-coordinator")
            coordinator = AsyncCoordinator(load_config(args.config))
            metrics_port = args.metrics_port
            if metrics_port is None:
                metrics_port = 0 if args.port == 0 else 9000
            return asyncio.run(
                serve(
                    coordinator,
                    args.host,
                    args.port,
                    args.watch,
                    args.grace,
                    security,
                    None if metrics_port < 0 else metrics_port,
                )
            )
        return asyncio.run(_predict(args))
    except (ConfigError, SettingsError, ClockError) as exc:
        print(f"xylen-coordinator: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"xylen-coordinator: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
