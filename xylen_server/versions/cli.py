"""``xylen-server model list|backup|restore|rollback``: model versions from the command line.

Each command prints what it did in a few lines and returns the exit code: 0 done, 1 refused (a
tampered archive, an unknown version, a server that refused). ``--address`` asks a running
server to reload or roll back itself over gRPC.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from training.metadata import MetadataError, ModelMetadata
from xylen_server.auth import read_token, with_token
from xylen_server.errors import XylenError
from xylen_server.settings import Settings
from xylen_server.tls import client_from_arguments, open_channel
from xylen_server.versions import history as model_history


def error(message: str, code: int = 1) -> int:
    """Print ``message`` as the command's one error line; returns ``code``."""
    print(f"xylen-server: error: {message}", file=sys.stderr)
    return code


def _stub(settings: Settings, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """A channel to ``--address`` with the command's TLS options and the admin token (from
    ``--token-file``, else the server's own ADMIN_TOKEN / ADMIN_TOKEN_FILE)."""
    from xylen.v1 import model_service_pb2_grpc as pb_grpc

    if args.token_file is not None:
        token = read_token("", args.token_file, "--token")
    else:
        token = read_token(settings.admin_token, settings.admin_token_file, "ADMIN_TOKEN")
    channel = open_channel(args.address, client_from_arguments(args))
    return channel, pb_grpc.ModelServiceStub(with_token(channel, token))


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
            return _restore(settings, args.archive, args)
        return _rollback(settings, args.to, args)
    except XylenError as exc:
        return error(exc.message)
    except grpc.RpcError as exc:
        return error(f"the server refused: {exc.code().name}: {exc.details()}")


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


def _restore(settings: Settings, archive: Path, args: argparse.Namespace) -> int:
    address = args.address
    meta = model_history.restore(archive, settings.model_path, settings.model_name)
    print(f"verified and restored {_describe(meta)} into {settings.model_dir}")
    if address:
        from xylen.v1 import model_service_pb2 as pb

        channel, stub = _stub(settings, args)
        with channel:
            response = stub.ReloadModel(pb.ReloadModelRequest(), timeout=300)
        print(
            f"server at {address} now serves v{response.model_info.version}"
            + (" (hot-swapped)" if response.changed else " (unchanged)")
        )
    else:
        print("a running server picks it up on SIGHUP (or the ReloadModel RPC)")
    return 0


def _rollback(settings: Settings, version: int, args: argparse.Namespace) -> int:
    address = args.address
    if address:
        from xylen.v1 import model_service_pb2 as pb

        channel, stub = _stub(settings, args)
        with channel:
            response = stub.RollbackModel(pb.RollbackModelRequest(version=version), timeout=300)
        print(
            f"server at {address} rolled back from v{response.previous_version} to "
            f"v{response.model_info.version}"
        )
        return 0
    version = model_history.rollback_target(
        settings.history_dir, ModelMetadata.read(settings.model_dir), version
    )
    meta = model_history.rollback_files(settings.model_path, settings.model_name, version)
    print(f"{settings.model_dir} now holds {_describe(meta)}")
    print("a running server picks it up on SIGHUP (or the ReloadModel RPC)")
    return 0
