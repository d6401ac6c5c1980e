"""The ``xylen-server model ...`` and ``xylen-server replay`` commands (see ``__main__``).

Each prints what it did in a few lines and returns the exit code: 0 done, 1 refused (a tampered
archive, an unknown version, a replay that is not bit-exact), 2 could not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import grpc
import numpy as np
import polars as pl

from training.metadata import MetadataError, ModelMetadata
from xylen_server.errors import ModelLoadError
from xylen_server.settings import Settings
from xylen_server.versions import history as model_history
from xylen_server.versions.history import HistoryError


def _error(message: str, code: int = 1) -> int:
    print(f"xylen-server: error: {message}", file=sys.stderr)
    return code


def _stub(address: str):  # type: ignore[no-untyped-def]
    from xylen.v1 import model_service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.ModelServiceStub(channel)


def _describe(meta: ModelMetadata) -> str:
    return (
        f"{meta.name} v{meta.version} (parent v{meta.parent_version or 0}, "
        f"{meta.training_samples} samples, trained {meta.trained_at})"
    )


def model_command(settings: Settings, args: argparse.Namespace) -> int:
    """``model list|backup|restore|rollback``."""
    try:
        if args.action == "list":
            return _list(settings)
        if args.action == "backup":
            return _backup(settings, args.out, args.version)
        if args.action == "restore":
            return _restore(settings, args.archive, args.address)
        return _rollback(settings, args.to, args.address)
    except HistoryError as exc:
        return _error(str(exc))
    except grpc.RpcError as exc:
        return _error(f"the server refused: {exc.code().name}: {exc.details()}")


def _list(settings: Settings) -> int:
    try:
        serving = ModelMetadata.read(settings.model_dir).version
    except MetadataError:
        serving = None
    for kept in model_history.list_versions(settings.history_dir):
        mark = "*" if kept.version == serving else " "
        print(f"{mark} {_describe(kept.meta)}")
    return 0


def _backup(settings: Settings, out: Path, version: int) -> int:
    source = settings.model_dir
    if version:
        source = model_history.find_version(settings.history_dir, version).path
    model_history.backup(source, out)
    meta = ModelMetadata.read(source)
    print(f"backed up {_describe(meta)} to {out}")
    return 0


def _restore(settings: Settings, archive: Path, address: str | None) -> int:
    meta = model_history.restore(archive, settings.model_path, settings.model_name)
    print(f"verified and restored {_describe(meta)} into {settings.model_dir}")
    if address:
        from xylen.v1 import model_service_pb2 as pb

        channel, stub = _stub(address)
        with channel:
            response = stub.ReloadModel(pb.ReloadModelRequest(), timeout=300)
        print(
            f"server at {address} now serves v{response.model_info.version}"
            + (" (hot-swapped)" if response.changed else " (unchanged)")
        )
    else:
        print("a running server picks it up on SIGHUP (or the ReloadModel RPC)")
    return 0


def _rollback(settings: Settings, version: int, address: str | None) -> int:
    if address:
        from xylen.v1 import model_service_pb2 as pb

        channel, stub = _stub(address)
        with channel:
            response = stub.RollbackModel(pb.RollbackModelRequest(version=version), timeout=300)
        print(
            f"server at {address} rolled back from v{response.previous_version} to "
            f"v{response.model_info.version}"
        )
        return 0
    if not version:
        current = ModelMetadata.read(settings.model_dir)
        below = [
            k.version
            for k in model_history.list_versions(settings.history_dir)
            if k.version < current.version
        ]
        if current.parent_version in below:
            version = int(current.parent_version or 0)
        elif below:
            version = max(below)
        else:
            return _error(f"no kept version below v{current.version}")
    meta = model_history.rollback_files(settings.model_path, settings.model_name, version)
    print(f"{settings.model_dir} now holds {_describe(meta)}")
    print("a running server picks it up on SIGHUP (or the ReloadModel RPC)")
    return 0


def replay_command(settings: Settings, prediction_id: str, log_dir: Path | None) -> int:
    """Find the logged prediction, load the version that made it, recompute, compare bits."""
    directory = log_dir or settings.prediction_log_path
    parts = sorted(Path(directory).glob("part-*.parquet"))
    if not parts:
        return _error(f"no prediction log parts in {directory}")
    found = pl.scan_parquet(parts).filter(pl.col("prediction_id") == prediction_id).collect()
    if found.height == 0:
        return _error(f"prediction {prediction_id!r} is not in the log at {directory}")
    row = found.row(0, named=True)
    version = int(row["model_version"])
    features = np.asarray(row["features"], dtype=np.float32)
    model_dir = settings.history_dir / str(version)
    if not model_dir.is_dir():
        try:
            if ModelMetadata.read(settings.model_dir).version == version:
                model_dir = settings.model_dir
        except MetadataError:
            pass
    if not model_dir.is_dir():
        return _error(f"model version {version} is no longer kept; cannot replay")
    from xylen_server.serving.model_store import load_model

    try:
        loaded = load_model(dataclasses.replace(settings, pool_size=1), model_dir)
    except ModelLoadError as exc:
        return _error(str(exc))
    try:
        replayed = float(loaded.engine.predict_proba(features.reshape(1, -1))[0])
        engine = loaded.engine.engine
    finally:
        loaded.close()
    logged = float(row["probability_up"])
    exact = replayed == logged
    print(f"prediction {prediction_id} at {row['time']} by {row['model_name']} v{version}")
    print(f"  features      {np.array2string(features, precision=6, max_line_width=96)}")
    print(f"  logged   P(up) {logged!r}  signal {row['signal']}")
    print(f"  replayed P(up) {replayed!r}  ({engine}, from {model_dir})")
    print(f"  bit-exact: {'yes' if exact else 'NO'}")
    return 0 if exact else 1
