"""``xylen-server replay PREDICTION_ID``: recompute a logged prediction with the model version
that made it and compare the bits (exit 0 bit-exact, 1 not, or not found)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from training.calibration import apply as calibrate
from training.metadata import MetadataError, ModelMetadata, model_input
from xylen_server.errors import ModelLoadError
from xylen_server.learning.prediction_log import PredictionLog
from xylen_server.serving.model_store import load_model
from xylen_server.settings import Settings
from xylen_server.versions.cli import error


def replay_command(settings: Settings, prediction_id: str, log_dir: Path | None) -> int:
    """Find the logged prediction, load the version that made it, recompute, compare bits."""
    directory = log_dir or settings.prediction_log_path
    # With WORKERS=N, worker i > 0 writes its parts under ``worker-<i>/`` (xylen_server.workers).
    directories = [directory, *sorted(p for p in directory.glob("worker-*") if p.is_dir())]
    row, parts = None, 0
    for place in directories:
        log = PredictionLog(place, reader=True)  # the server's own: left as it is
        try:
            parts += len(log.part_files())
            row = log.find(prediction_id) if log.part_files() else None
        finally:
            log.close()
        if row is not None:
            break
    if parts == 0:
        return error(f"no prediction log parts in {directory}")
    if row is None:
        return error(f"prediction {prediction_id!r} is not in the log at {directory}")
    version = row.model_version
    features = np.asarray(row.features, dtype=np.float32)
    model_dir = settings.history_dir / str(version)
    if not model_dir.is_dir():
        try:
            if ModelMetadata.read(settings.model_dir).version == version:
                model_dir = settings.model_dir
        except MetadataError:
            pass
    if not model_dir.is_dir():
        return error(f"model version {version} is no longer kept; cannot replay")
    try:
        loaded = load_model(dataclasses.replace(settings, pool_size=1), model_dir)
    except ModelLoadError as exc:
        return error(str(exc))
    try:
        # As the predictor computes what it logs: the engine on model_input, then the model's
        # calibration (every `make train` model has one; comparing the engine's raw P(up) with
        # the logged calibrated one said "NO" for every such prediction).
        raw = loaded.engine.predict_proba(model_input(features.reshape(1, -1)))
        replayed = float(calibrate(loaded.meta.calibration, raw)[0])
        calibrated = bool(loaded.meta.calibration)
        engine = loaded.engine.engine
    finally:
        loaded.close()
    logged = row.probability_up
    exact = replayed == logged
    when = datetime.fromtimestamp(row.time_ms / 1000, UTC)
    print(f"prediction {prediction_id} at {when} by {row.model_name} v{version}")
    print(f"  features      {np.array2string(features, precision=6, max_line_width=96)}")
    print(f"  logged   P(up) {logged!r}  signal {row.signal}")
    how = f"{engine}{', calibrated' if calibrated else ''}"
    print(f"  replayed P(up) {replayed!r}  ({how}, from {model_dir})")
    print(f"  bit-exact: {'yes' if exact else 'NO'}")
    return 0 if exact else 1
