"""``xylen-server model import FILE``: a booster trained elsewhere becomes a model directory.

The file is a LightGBM text model (the seed's flat ``models/lightgbm_model.txt``), an XGBoost
JSON model or a CatBoost ``.cbm`` (the type from the extension, or ``--type``). Nothing about
it is taken on trust:

* it must be a binary classifier of P(up) (LightGBM ``binary``, XGBoost ``binary:logistic``,
  CatBoost ``Logloss``/``CrossEntropy``);
* its feature names must be features :mod:`training.features` defines (a selection of
  :data:`~training.features.FEATURE_NAMES` in any order, the seed's ``FEATURES``, computed over
  ``--lookback`` candles, the seed's ``LOOKBACK_PERIODS``); unnamed or foreign features, a
  feature named twice or a lookback too short for them are refused with one line naming the
  problem, since the server could not compute what each tree expects;
* the directory is written by the training code's own writer
  (:func:`training.trainers.write_model_dir`: native file, sha256 checksums, feature importance,
  ``metadata.json``, ONNX through the project's exporter) into a staging directory, then loaded
  exactly as a server loads a model (feature hash, checksums, ONNX-vs-native parity within
  1e-5, warm-up) before it is moved into ``MODEL_PATH/MODEL_NAME``.

The metadata says what the booster cannot: the label's horizon, fee and threshold (``--horizon``,
``--fee``, ``--label-threshold``; training's defaults otherwise), the symbol and interval. It
lists no training files (``data.imported_from`` names the source and its sha256), so a full
retrain of an imported model learns from its feedback only and says so. An existing model of
that name is never overwritten.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training import features
from training.config import TrainConfig
from training.metadata import MODEL_TYPES, NATIVE_FILES, ModelMetadata, sha256_file
from xylen_server.errors import FailedPrecondition, InvalidArgument, ModelLoadError
from xylen_server.settings import Settings

EXTENSIONS = {".txt": "lightgbm", ".json": "xgboost", ".cbm": "catboost"}
"""Model type by file extension, when ``--type`` is not given."""


@dataclass(frozen=True)
class Imported:
    """What an import wrote, and how long each step took (seconds)."""

    meta: ModelMetadata
    model_dir: Path
    parity_max_difference: float | None
    seconds: dict[str, float]


def model_type_of(source: Path, model_type: str | None) -> str:
    """``model_type`` if given, else the type the file's extension names."""
    if model_type:
        if model_type not in MODEL_TYPES:
            raise InvalidArgument(
                f"--type {model_type!r} is not one of {', '.join(MODEL_TYPES)}",
                reason="UNKNOWN_MODEL_TYPE",
            )
        return model_type
    found = EXTENSIONS.get(source.suffix.lower())
    if found is None:
        raise InvalidArgument(
            f"cannot tell the model type of {source.name} from its extension; pass --type "
            f"({', '.join(MODEL_TYPES)})",
            reason="UNKNOWN_MODEL_TYPE",
        )
    return found


def booster_features(model_type: str, path: Path) -> tuple[list[str], str]:
    """The booster's feature names in input order, and its objective (native libraries)."""
    try:
        if model_type == "lightgbm":
            import lightgbm as lgb

            booster = lgb.Booster(model_file=str(path))
            objective = str(booster.dump_model(num_iteration=1).get("objective", ""))
            return list(booster.feature_name()), objective.split()[0] if objective else ""
        if model_type == "xgboost":
            import json

            import xgboost as xgb

            xbooster = xgb.Booster(model_file=str(path))
            config = json.loads(xbooster.save_config())
            objective = config.get("learner", {}).get("objective", {}).get("name", "")
            return list(xbooster.feature_names or []), str(objective)
        from catboost import CatBoostClassifier

        model = CatBoostClassifier()
        model.load_model(str(path), format="cbm")
        loss = str(model.get_all_params().get("loss_function", ""))
        return list(model.feature_names_ or []), loss
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise InvalidArgument(
            f"{path} is not a readable {model_type} model: {str(exc).splitlines()[0][:200]}",
            reason="UNREADABLE_MODEL",
        ) from exc
    except Exception as exc:  # each library has its own error type for a foreign file
        raise InvalidArgument(
            f"{path} is not a readable {model_type} model: {type(exc).__name__}",
            reason="UNREADABLE_MODEL",
        ) from exc


_BINARY = {"lightgbm": ("binary",), "xgboost": ("binary:logistic",)}
_BINARY_CATBOOST = ("Logloss", "CrossEntropy")


def check_booster(
    model_type: str, names: list[str], objective: str, lookback: int
) -> features.FeatureSet:
    """The feature selection a booster takes, or a refusal of one that is not a P(up)
    classifier over features the server computes."""
    allowed = _BINARY.get(model_type, _BINARY_CATBOOST)
    if objective not in allowed:
        raise InvalidArgument(
            f"the {model_type} model's objective is {objective or 'unknown'!r}, not a binary "
            f"classifier ({' or '.join(allowed)}); its output would not be P(up)",
            reason="NOT_A_BINARY_CLASSIFIER",
        )
    defined = set(features.FEATURE_NAMES)
    unknown = [n for n in names if n not in defined]
    if unknown or not names:
        shown = ", ".join(repr(n[:40]) for n in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        problem = (
            f"{len(unknown)} of its {len(names)} features are not defined in "
            f"training/features.py ({shown})"
            if names
            else "it names no features"
        )
        if unknown and all(n.startswith(("Column_", "f")) or n.isdigit() for n in unknown):
            problem += "; the booster was trained without feature names"
        raise InvalidArgument(
            f"feature mismatch: {problem}; a model must take features named as in "
            "training/features.py FEATURE_NAMES (any subset and order)",
            reason="FEATURE_MISMATCH",
        )
    try:
        return features.FeatureSet.of(names, lookback)
    except features.FeatureError as exc:
        raise InvalidArgument(
            f"feature mismatch: {str(exc)[:240]}", reason="FEATURE_MISMATCH"
        ) from None


def import_model(
    source: Path,
    settings: Settings,
    *,
    model_type: str | None = None,
    horizon: int = TrainConfig.horizon,
    fee: float = TrainConfig.fee,
    label_threshold: float = TrainConfig.threshold,
    symbol: str = "",
    interval: str = "",
    lookback: int | None = None,
) -> Imported:
    """Check ``source``, write it as ``settings.model_dir`` version 1 (or the next after kept
    versions), converted, verified and loaded as a server would; returns what was written."""
    from training.labels import label_from_return
    from training.onnx_export import ConversionError
    from training.trainers import MODEL_CLASSES, write_model_dir
    from xylen_server.serving.model_store import load_model

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    source = Path(source)
    if not source.is_file():
        raise InvalidArgument(f"{source} is not a file", reason="UNREADABLE_MODEL")
    kind = model_type_of(source, model_type)
    try:
        label_from_return(0.0, fee=fee, threshold=label_threshold)  # the label rule checks them
    except ValueError as exc:
        raise InvalidArgument(f"--fee: {exc}", reason="BAD_FEE") from exc
    if horizon < 1:
        raise InvalidArgument(f"--horizon must be >= 1 bar, got {horizon}", reason="BAD_HORIZON")
    target = settings.model_dir
    if target.exists():
        raise FailedPrecondition(
            f"{target} exists already; an import never overwrites a model (choose another "
            "MODEL_NAME, or remove it first)",
            reason="MODEL_EXISTS",
        )
    names, objective = booster_features(kind, source)
    selection = check_booster(
        kind, names, objective, features.LOOKBACK_PERIODS if lookback is None else lookback
    )
    seconds["check"] = time.perf_counter() - started

    kept = settings.history_dir
    version = 1 + max((int(p.name) for p in kept.glob("*") if p.name.isdigit()), default=0)
    meta = ModelMetadata(
        name=settings.model_name,
        model_type=kind,
        version=version,
        training_samples=0,
        trained_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        feature_names=list(selection.names),
        lookback=selection.lookback,
        features_hash=selection.definitions_hash(),
        horizon=horizon,
        fee=fee,
        label_threshold=label_threshold,
        symbol=symbol,
        interval=interval,
        data={
            "imported_from": str(source.resolve()),
            "imported_sha256": sha256_file(source),
            "files": [],
        },
        params={},
    )
    settings.model_path.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".import-{settings.model_name}-", dir=settings.model_path)
    )
    try:
        with tempfile.TemporaryDirectory() as scratch:
            native = Path(scratch) / NATIVE_FILES[kind]
            shutil.copyfile(source, native)
            model = MODEL_CLASSES[kind].load(Path(scratch), meta.feature_names)
            step = time.perf_counter()
            try:
                written = write_model_dir(staging / settings.model_name, model, meta)
            except ConversionError as exc:
                raise ModelLoadError(f"{source}: {exc}") from exc
            seconds["write_and_convert"] = time.perf_counter() - step
        step = time.perf_counter()
        loaded = load_model(settings, staging / settings.model_name)
        parity = loaded.parity_max_difference
        loaded.close()
        seconds["load_and_parity"] = time.perf_counter() - step
        (staging / settings.model_name).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds["total"] = time.perf_counter() - started
    return Imported(written, target, parity, seconds)


def describe(imported: Imported) -> list[str]:
    """The lines ``model import`` prints."""
    meta = imported.meta
    parity: Any = imported.parity_max_difference
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in imported.seconds.items())
    return [
        f"imported {meta.model_type} model as {meta.name} v{meta.version} into "
        f"{imported.model_dir}",
        f"  {len(meta.feature_names)} features defined in training/features.py, lookback "
        f"{meta.lookback}; horizon "
        f"{meta.horizon} bar(s), fee {meta.fee:g}, label threshold {meta.label_threshold:g}",
        f"  ONNX parity {parity:.2g} (tolerance 1e-5)"
        if parity is not None
        else "  served natively (ONNX_ENABLED=false): no ONNX parity check",
        f"  {timing}",
        f"  serve it: MODEL_PATH={imported.model_dir.parent} MODEL_NAME={meta.name} xylen-server",
    ]
