"""``xylen-server`` / ``python -m xylen_server``: a model server configured by the environment."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from xylen_server.settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xylen-server",
        description="Serve one model over gRPC. Configured by environment variables: MODEL_NAME, "
        "MODEL_PATH, ONNX_ENABLED, LOG_LEVEL, GRPC_HOST, GRPC_PORT, SESSION_POOL_SIZE, "
        "SESSION_THREADS, MAX_BATCH_ROWS, BUY_THRESHOLD, SELL_THRESHOLD, ... (see README).",
    )
    parser.add_argument("command", nargs="?", default="serve", choices=["serve"])
    parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"xylen-server: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _quiet_native_libraries()
    from xylen_server.server import serve  # after logging is set up; imports are heavy

    try:
        return asyncio.run(serve(settings))
    except OSError as exc:
        print(f"xylen-server: error: {exc}", file=sys.stderr)
        return 2


def _quiet_native_libraries() -> None:
    """Route LightGBM's own console output through logging (DEBUG), so a corrupt model file ends
    the process with the server's one clear line rather than pages of library output."""
    import lightgbm

    library_logger = logging.getLogger("lightgbm")
    lightgbm.register_logger(library_logger, info_method_name="debug", warning_method_name="debug")


if __name__ == "__main__":
    sys.exit(main())
