"""Training configuration: a YAML file (``training/default.yaml``), the environment, then
command-line overrides (``--set key=value``), later ones winning.

The environment supplies the settings the seed names (:data:`ENV_KEYS`: ``LOOKBACK_PERIODS``,
``FEATURES``, ``TRAIN_START_DATE``, ``TRAIN_END_DATE``, ...); ``make train VAR=...`` passes the
same names on as ``--set``. ``FEATURES`` is a YAML list or a comma-separated list of names from
:data:`training.features.FEATURE_NAMES`, in the order the model takes them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from training.features import FeatureError, FeatureSet
from training.klines import AnomalyPolicy
from training.metadata import MODEL_TYPES

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")

#: Settings read from the environment (by these names), between the file and ``--set``.
ENV_KEYS = (
    "LOOKBACK_PERIODS",
    "FEATURES",
    "TRAIN_START_DATE",
    "TRAIN_END_DATE",
    "VALIDATION_END_DATE",
    "TEST_END_DATE",
)


def _feature_list(value: Any) -> tuple[str, ...] | None:
    """``FEATURES`` as given: None (all), a list, or a comma-separated string."""
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value)
    raise ConfigError(f"FEATURES must be a list of feature names, got {type(value).__name__}")


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclass(frozen=True)
class ModelSpec:
    """One model of the set: a name, a type and optional overrides of the shared settings."""

    name: str
    model_type: str = "lightgbm"
    horizon: int | None = None
    fee: float | None = None
    threshold: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    lookback_periods: int | None = None
    features: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", _feature_list(self.features))
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model {self.name}: model_type {self.model_type!r} is not one of "
                f"{', '.join(MODEL_TYPES)}"
            )
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"model name {self.name!r} is not a plain directory name")


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting; see ``default.yaml`` for what each means."""

    data: str = "data/default"
    symbol: str = "BTCUSDT"
    interval: str | None = None
    anomaly_policy: str = "drop"
    generate_start: str = "2023-01"
    generate_end: str = "2024-12"
    generate_seed: int = 7
    train_start_date: str | None = None
    train_end_date: str | None = None
    train_fraction: float = 0.6
    validation_fraction: float = 0.2
    validation_end_date: str | None = None
    test_end_date: str | None = None
    gap_bars: int | None = None
    walk_forward_folds: int = 0
    horizon: int = 1
    fee: float = 0.001
    threshold: float = 0.0
    lookback_periods: int | None = None
    features: tuple[str, ...] | None = None
    signal_min_share: float = 0.15
    signal_max_share: float = 0.40
    models_dir: str = "models"
    seed: int = 42
    num_threads: int = 2
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: tuple[ModelSpec, ...] = (ModelSpec("model_1"),)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", _feature_list(self.features))
        AnomalyPolicy(self.anomaly_policy)  # raises on an unknown policy
        if self.horizon < 1:
            raise ConfigError(f"horizon must be >= 1 bar, got {self.horizon}")
        if not 0 <= self.fee < 1:
            raise ConfigError(f"fee must be a fraction in [0, 1), got {self.fee}")
        if len({m.name for m in self.models}) != len(self.models):
            raise ConfigError("model names must be unique")
        if not (
            self.train_fraction > 0
            and self.validation_fraction > 0
            and self.train_fraction + self.validation_fraction < 1
        ):
            raise ConfigError(
                "need train_fraction > 0, validation_fraction > 0 and their sum below 1 (the "
                f"test period is the rest), got {self.train_fraction} and "
                f"{self.validation_fraction}"
            )
        if not 0 < self.signal_min_share <= self.signal_max_share <= 0.5:
            raise ConfigError(
                "need 0 < signal_min_share <= signal_max_share <= 0.5, got "
                f"{self.signal_min_share} and {self.signal_max_share}"
            )
        owners = [("", self.lookback_periods)]
        owners += [(f"model {m.name}: ", m.lookback_periods) for m in self.models]
        for owner, value in owners:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(
                    f"{owner}LOOKBACK_PERIODS must be a whole number of candles, "
                    f"got {str(value)[:40]!r}"
                )
        for spec in self.models:
            try:
                self.feature_set(spec)
            except FeatureError as exc:
                raise ConfigError(f"model {spec.name}: {exc}") from None

    def model(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise ConfigError(f"no model named {name!r}; have {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def feature_set(self, spec: ModelSpec) -> FeatureSet:
        """The model's ``FEATURES`` and ``LOOKBACK_PERIODS`` (its own, else the shared ones,
        else every defined feature over :data:`training.features.LOOKBACK_PERIODS`)."""
        return FeatureSet.of(
            spec.features if spec.features is not None else self.features,
            spec.lookback_periods if spec.lookback_periods is not None else self.lookback_periods,
        )

    def model_params(self, spec: ModelSpec) -> dict[str, Any]:
        return {**self.params.get(spec.model_type, {}), **spec.params}


def _from_mapping(raw: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {str(k).lower(): v for k, v in raw.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
    for key, value in values.items():  # YAML reads 2024-04-30 as a date; keep text
        if isinstance(value, date):
            values[key] = value.isoformat()
    if "models" in values:
        try:
            values["models"] = tuple(
                m if isinstance(m, ModelSpec) else ModelSpec(**m) for m in values["models"]
            )
        except TypeError as exc:
            raise ConfigError(f"bad model entry: {exc}") from exc
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value (``horizon=4``, ``params.lightgbm.num_leaves=15``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text[:80]!r} is not key=value")
    return key.strip().lower(), _yaml_value(key.strip(), value)


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The :data:`ENV_KEYS` set (non-empty) in ``environ`` (default ``os.environ``), as YAML."""
    environ = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    for key in ENV_KEYS:
        raw = environ.get(key, "").strip()
        if raw:
            found[key.lower()] = _yaml_value(key, raw)
    return found


def _yaml_value(key: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"{key}={raw[:80]!r} is not a valid value") from None


def load_config(
    path: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> TrainConfig:
    """The configuration in ``path`` (default ``training/default.yaml``), then the
    :data:`ENV_KEYS` found in ``environ`` (default ``os.environ``), then ``overrides``.

    Override keys may be dotted to reach into nested mappings (``params.xgboost.max_depth``).
    """
    source = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {source}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source} does not hold a mapping")
    raw = {str(k).lower(): v for k, v in raw.items()}
    for key, value in {**env_overrides(environ), **(overrides or {})}.items():
        *parents, leaf = key.lower().split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a mapping")
        node[leaf] = value
    return _from_mapping(raw)
