"""``xylen-server`` / ``python -m xylen_server``: a model server configured by the environment,
and the model-admin commands that work on its files (and, with ``--address``, on it live).

Commands (MODEL_PATH and MODEL_NAME name the model, as for ``serve``)::

    xylen-server [serve]                               serve over gRPC
    xylen-server model list                            kept versions (newest first)
    xylen-server model backup --out FILE.tar.gz        one archive: files, metadata, sha256s
    xylen-server model restore FILE.tar.gz [--address HOST:PORT]
    xylen-server model rollback [--to VERSION] [--address HOST:PORT]
    xylen-server replay PREDICTION_ID [--log-dir DIR]  recompute a past prediction
    xylen-server model import FILE [--type T] [--horizon N] [--fee F] [--label-threshold T]
                                                       a booster trained elsewhere, checked

``restore`` verifies every checksum before it installs anything; a tampered archive is refused
(exit 1). ``rollback`` and ``restore`` change the files on disk; a running server picks the
change up through its hot swap when told: ``--address`` calls its RollbackModel / ReloadModel
RPC, or send it SIGHUP. ``rollback --address`` asks the server to do the rollback itself.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from xylen_server.errors import SettingsError
from xylen_server.memory import ARROW_POOL_VARIABLE
from xylen_server.settings import Settings
from xylen_server.tls import add_client_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xylen-server",
        description="Serve one model over gRPC. Configured by environment variables: MODEL_NAME, "
        "MODEL_PATH, ONNX_ENABLED, LOG_LEVEL, GRPC_HOST, GRPC_PORT, SESSION_POOL_SIZE, "
        "SESSION_THREADS, MAX_BATCH_ROWS, BUY_THRESHOLD, SELL_THRESHOLD, FEEDBACK_DATA_DIR, "
        "RETRAIN_*, TLS_CERT_FILE, TLS_KEY_FILE, TLS_CLIENT_CA_FILE, ADMIN_TOKEN(_FILE), "
        "ADMIN_IDENTITIES, PREDICT_TOKEN(_FILE), ALLOW_INSECURE_ADMIN, ... (see README and "
        "xylen_server/settings.py).",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve the model over gRPC (the default)")
    model = commands.add_parser(
        "model", help="model versions: list, backup, restore, rollback, import"
    )
    actions = model.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="list the kept versions")
    backup = actions.add_parser("backup", help="write the serving model to one archive")
    backup.add_argument("--out", type=Path, required=True, help="archive to write (.tar.gz)")
    backup.add_argument("--version", type=int, default=0, help="a kept version (default serving)")
    restore = actions.add_parser("restore", help="verify an archive and make it the serving model")
    restore.add_argument("archive", type=Path)
    restore.add_argument("--address", help="HOST:PORT of a running server to reload")
    add_client_arguments(restore)
    rollback = actions.add_parser("rollback", help="serve a kept earlier version again")
    rollback.add_argument("--to", type=int, default=0, help="version (default: the parent)")
    rollback.add_argument("--address", help="HOST:PORT of a running server to roll back")
    add_client_arguments(rollback)
    imported = actions.add_parser(
        "import",
        help="write an outside booster (LightGBM .txt, XGBoost .json, CatBoost .cbm) as "
        "MODEL_PATH/MODEL_NAME, its features checked and its ONNX verified",
    )
    imported.add_argument("file", type=Path, help="the booster file")
    imported.add_argument("--type", dest="model_type", help="lightgbm, xgboost or catboost")
    imported.add_argument("--horizon", type=int, help="label horizon in bars (default: training's)")
    imported.add_argument("--fee", type=float, help="round-trip fee fraction of the label")
    imported.add_argument("--label-threshold", type=float, help="net return labelled up")
    imported.add_argument(
        "--lookback", type=int, help="candles a feature row needs (default LOOKBACK_PERIODS)"
    )
    imported.add_argument("--symbol", default="", help="e.g. BTCUSDT")
    imported.add_argument("--interval", default="", help="e.g. 1h")
    replay = commands.add_parser("replay", help="recompute a logged prediction bit-exactly")
    replay.add_argument("prediction_id")
    replay.add_argument("--log-dir", type=Path, help="prediction log (default: the server's)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"xylen-server: error: {exc}", file=sys.stderr)
        return 2
    if settings.worker_cpu >= 0:  # a worker of several: first, before any thread starts
        from xylen_server.workers import pin_to_cpu

        pin_to_cpu(settings.worker_cpu)
    # Before anything imports pyarrow, which picks its C++ default pool once, at import.
    os.environ[ARROW_POOL_VARIABLE] = settings.arrow_memory_pool
    who = f"[worker {settings.worker_index}] " if settings.worker_index >= 0 else ""
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "model":
        from xylen_server.versions.cli import model_command

        return model_command(settings, args)
    if args.command == "replay":
        from xylen_server.learning.replay import replay_command

        return replay_command(settings, args.prediction_id, args.log_dir)
    if settings.worker_index < 0:
        from xylen_server.workers import supervise, worker_count

        count = worker_count(settings.workers)
        if count > 1:  # the supervisor: no gRPC object (nor grpc) in this process
            return asyncio.run(supervise(settings, count))
    from xylen_server.server import serve  # after logging is set up; imports are heavy
    from xylen_server.telemetry import configure_tracing

    try:
        configure_tracing("xylen-server")
    except SettingsError as exc:
        print(f"xylen-server: error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(settings))
    except OSError as exc:
        print(f"xylen-server: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
