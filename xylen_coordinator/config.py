"""The coordinator's configuration: config.yaml, validated into one frozen object.

The file's shape follows the seed (``model_endpoints``, ``retraining``) plus the fan-out
settings (deadline, quorum, thresholds, weights, transport, TLS). Every key is checked at load:
an unknown key, a duplicate endpoint name, a negative or all-zero weight or a bad port raises
:class:`ConfigError` whose message starts with the dotted key, e.g.
``model_endpoints[2].port: must be an integer in 1..65535, got 70000``.

A reload (SIGHUP) builds a new :class:`Config` first and swaps it in only when it is valid, so a
bad file keeps the old configuration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The configuration file is unreadable or holds a value the coordinator cannot use."""


@dataclass(frozen=True)
class Endpoint:
    """One model server the coordinator fans out to."""

    name: str
    """Unique name, shown in every vote (``model_1``)."""
    host: str
    """Host name or address of the server."""
    port: int
    """gRPC port of the server, 1..65535."""
    weight: float = 1.0
    """Static weight of its vote, >= 0 (renormalised over the servers that voted)."""
    enabled: bool = True
    """False keeps the endpoint configured but out of the ensemble."""

    @property
    def address(self) -> str:
        """``host:port`` as gRPC dials it (IPv6 literals in brackets)."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Quorum:
    """When enough servers voted for the coordinator to answer at all."""

    min_weight_fraction: float = 0.5
    """Fraction of the enabled endpoints' total configured weight that must vote, in (0, 1]."""
    min_votes: int = 1
    """Fewest votes for a decision, >= 1."""


@dataclass(frozen=True)
class Thresholds:
    """Signal thresholds applied to the ensemble probability (same rule as the servers)."""

    buy: float = 0.55
    """P(up) at or above which the signal is BUY."""
    sell: float = 0.45
    """P(up) at or below which the signal is SELL."""


@dataclass(frozen=True)
class Adaptive:
    """Adaptive weights: each endpoint's weight follows its record on matured outcomes."""

    metric: str = "brier"
    """``brier`` (multiplier 0.25 / decayed Brier) or ``hit_rate`` (decayed hit rate / 0.5)."""
    half_life_outcomes: float = 50.0
    """Outcomes after which an old outcome counts half."""
    min_outcomes: float = 20.0
    """Effective outcomes before the multiplier leaves 1."""
    floor: float = 0.25
    """Smallest multiplier, > 0, so a model that had a bad run can earn its way back."""
    cap: float = 2.0
    """Largest multiplier, >= floor."""


@dataclass(frozen=True)
class Weights:
    """How vote weights are chosen."""

    mode: str = "static"
    """``static`` (configured weights) or ``adaptive`` (configured weights x live multiplier)."""
    adaptive: Adaptive = field(default_factory=Adaptive)
    """Settings of the adaptive mode."""


@dataclass(frozen=True)
class Retraining:
    """Feedback handling (the seed's ``retraining`` block)."""

    enabled: bool = True
    """Accept outcomes on Feedback (FAILED_PRECONDITION FEEDBACK_DISABLED when false)."""
    send_feedback_to_models: bool = True
    """Forward each outcome to the Feedback RPC of every model that voted on the prediction."""
    feedback_delay_seconds: float = 60.0
    """Wait this long after receipt before forwarding, >= 0."""


@dataclass(frozen=True)
class FeedbackQueueSettings:
    """Where and how the durable feedback queue works."""

    path: Path = Path("run/coordinator/feedback.sqlite3")
    """SQLite file (WAL, fsync on commit); relative paths are relative to the config file."""
    retry_initial_seconds: float = 1.0
    """First retry delay after a failed delivery; doubles per attempt."""
    retry_max_seconds: float = 60.0
    """Longest retry delay."""
    call_timeout_seconds: float = 5.0
    """Deadline of one forwarded Feedback call."""


@dataclass(frozen=True)
class Transport:
    """How the coordinator talks to the model servers."""

    use_stream: bool = True
    """Multiplex requests over one PredictStream per server; false uses unary Predict only."""
    keepalive_time_ms: int = 10_000
    """Interval of HTTP/2 keepalive pings on each channel (the servers accept >= 5000)."""
    keepalive_timeout_ms: int = 5_000
    """Time to wait for a ping's ack before the connection is considered dead."""
    reconnect_backoff_initial_ms: int = 100
    """First delay before reconnecting to a server that went away."""
    reconnect_backoff_max_ms: int = 2_000
    """Longest delay between reconnection attempts."""


@dataclass(frozen=True)
class Tls:
    """TLS towards the model servers. Placeholder: only ``enabled: false`` is accepted today."""

    enabled: bool = False
    """Use TLS (not supported yet)."""
    ca_file: str = ""
    """PEM file of the CA that signed the servers' certificates."""
    cert_file: str = ""
    """PEM client certificate, for mTLS."""
    key_file: str = ""
    """PEM client key, for mTLS."""


@dataclass(frozen=True)
class Config:
    """The whole coordinator configuration."""

    model_endpoints: tuple[Endpoint, ...]
    """Model servers, in the order votes are reported."""
    deadline_ms: float = 500.0
    """Default time budget of one fan-out, > 0."""
    quorum: Quorum = field(default_factory=Quorum)
    """Minimum votes and weight for a decision."""
    thresholds: Thresholds = field(default_factory=Thresholds)
    """Ensemble signal thresholds."""
    weights: Weights = field(default_factory=Weights)
    """Static or adaptive weights."""
    retraining: Retraining = field(default_factory=Retraining)
    """Feedback acceptance and forwarding."""
    feedback_queue: FeedbackQueueSettings = field(default_factory=FeedbackQueueSettings)
    """The durable feedback queue."""
    transport: Transport = field(default_factory=Transport)
    """Channel and stream settings."""
    tls: Tls = field(default_factory=Tls)
    """TLS placeholder."""
    source: Path | None = None
    """File the configuration was read from, if any."""

    @property
    def enabled_endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.model_endpoints if e.enabled)

    def endpoint(self, name: str) -> Endpoint | None:
        return next((e for e in self.model_endpoints if e.name == name), None)


# ---------------------------------------------------------------------------------------------
# Validation helpers: each takes the dotted key so every message names it.


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__}")
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(f"{key}: keys must be strings, got {k!r}")
    return value


def _check_keys(raw: Mapping[str, Any], allowed: set[str], key: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})"
        )


def _number(raw: Mapping[str, Any], name: str, key: str, default: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return float(value)


def _integer(raw: Mapping[str, Any], name: str, key: str, default: int) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: must be an integer, got {value!r}")
    return value


def _bool(raw: Mapping[str, Any], name: str, key: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def _string(raw: Mapping[str, Any], name: str, key: str, default: str) -> str:
    value = raw.get(name, default)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string, got {value!r}")
    return value


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _endpoint(raw: Any, key: str) -> Endpoint:
    raw = _mapping(raw, key)
    _check_keys(raw, {"name", "host", "port", "weight", "enabled"}, key)
    for required in ("name", "host", "port"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}: required")
    name = _string(raw, "name", f"{key}.name", "")
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ConfigError(
            f"{key}.name: must be a non-empty name of letters, digits, _-., got {name!r}"
        )
    host = _string(raw, "host", f"{key}.host", "")
    if not host.strip():
        raise ConfigError(f"{key}.host: must not be empty")
    port = raw["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{key}.port: must be an integer in 1..65535, got {port!r}")
    weight = _number(raw, "weight", f"{key}.weight", 1.0)
    if weight < 0:
        raise ConfigError(f"{key}.weight: must not be negative, got {weight}")
    enabled = _bool(raw, "enabled", f"{key}.enabled", True)
    return Endpoint(name=name, host=host.strip(), port=port, weight=weight, enabled=enabled)


def _endpoints(value: Any) -> tuple[Endpoint, ...]:
    key = "model_endpoints"
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: must be a non-empty list of endpoints")
    endpoints = tuple(_endpoint(item, f"{key}[{i}]") for i, item in enumerate(value))
    seen: dict[str, int] = {}
    addresses: dict[str, int] = {}
    for i, endpoint in enumerate(endpoints):
        if endpoint.name in seen:
            raise ConfigError(
                f"{key}[{i}].name: duplicate name {endpoint.name!r} "
                f"(also model_endpoints[{seen[endpoint.name]}])"
            )
        seen[endpoint.name] = i
        if endpoint.address in addresses:
            raise ConfigError(
                f"{key}[{i}].port: {endpoint.address} is already model_endpoints"
                f"[{addresses[endpoint.address]}]"
            )
        addresses[endpoint.address] = i
    enabled = [e for e in endpoints if e.enabled]
    if not enabled:
        raise ConfigError(f"{key}: no endpoint is enabled")
    if sum(e.weight for e in enabled) <= 0:
        raise ConfigError(f"{key}: the weights of the enabled endpoints are all zero")
    return endpoints


def _quorum(value: Any, n_enabled: int) -> Quorum:
    key = "quorum"
    raw = _mapping(value, key)
    _check_keys(raw, {"min_weight_fraction", "min_votes"}, key)
    fraction = _number(raw, "min_weight_fraction", f"{key}.min_weight_fraction", 0.5)
    if not 0 < fraction <= 1:
        raise ConfigError(f"{key}.min_weight_fraction: must be in (0, 1], got {fraction}")
    votes = _integer(raw, "min_votes", f"{key}.min_votes", 1)
    if not 1 <= votes <= n_enabled:
        raise ConfigError(
            f"{key}.min_votes: must be in 1..{n_enabled} (the enabled endpoints), got {votes}"
        )
    return Quorum(min_weight_fraction=fraction, min_votes=votes)


def _thresholds(value: Any) -> Thresholds:
    key = "thresholds"
    raw = _mapping(value, key)
    _check_keys(raw, {"buy", "sell"}, key)
    buy = _number(raw, "buy", f"{key}.buy", 0.55)
    sell = _number(raw, "sell", f"{key}.sell", 0.45)
    if not 0 <= sell < buy <= 1:
        raise ConfigError(f"{key}: need 0 <= sell < buy <= 1, got sell={sell} buy={buy}")
    return Thresholds(buy=buy, sell=sell)


def _weights(value: Any) -> Weights:
    key = "weights"
    raw = _mapping(value, key)
    _check_keys(raw, {"mode", "adaptive"}, key)
    mode = _string(raw, "mode", f"{key}.mode", "static")
    if mode not in ("static", "adaptive"):
        raise ConfigError(f"{key}.mode: must be 'static' or 'adaptive', got {mode!r}")
    akey = f"{key}.adaptive"
    araw = _mapping(raw.get("adaptive"), akey)
    _check_keys(araw, {"metric", "half_life_outcomes", "min_outcomes", "floor", "cap"}, akey)
    metric = _string(araw, "metric", f"{akey}.metric", "brier")
    if metric not in ("brier", "hit_rate"):
        raise ConfigError(f"{akey}.metric: must be 'brier' or 'hit_rate', got {metric!r}")
    half_life = _number(araw, "half_life_outcomes", f"{akey}.half_life_outcomes", 50.0)
    if half_life <= 0:
        raise ConfigError(f"{akey}.half_life_outcomes: must be > 0, got {half_life}")
    min_outcomes = _number(araw, "min_outcomes", f"{akey}.min_outcomes", 20.0)
    if min_outcomes < 0:
        raise ConfigError(f"{akey}.min_outcomes: must not be negative, got {min_outcomes}")
    # Decayed counts saturate at 1 / (1 - d): a minimum at or above that is never reached.
    ceiling = 1.0 / (1.0 - 0.5 ** (1.0 / half_life))
    if min_outcomes >= ceiling:
        raise ConfigError(
            f"{akey}.min_outcomes: must be below {ceiling:.1f}, the most effective outcomes a "
            f"half-life of {half_life:g} can hold, got {min_outcomes:g}"
        )
    floor = _number(araw, "floor", f"{akey}.floor", 0.25)
    cap = _number(araw, "cap", f"{akey}.cap", 2.0)
    if floor <= 0:
        raise ConfigError(f"{akey}.floor: must be > 0, got {floor}")
    if cap < floor:
        raise ConfigError(f"{akey}.cap: must be >= floor ({floor}), got {cap}")
    adaptive = Adaptive(metric, half_life, min_outcomes, floor, cap)
    return Weights(mode=mode, adaptive=adaptive)


def _retraining(value: Any) -> Retraining:
    key = "retraining"
    raw = _mapping(value, key)
    _check_keys(raw, {"enabled", "send_feedback_to_models", "feedback_delay_seconds"}, key)
    delay = _number(raw, "feedback_delay_seconds", f"{key}.feedback_delay_seconds", 60.0)
    if delay < 0:
        raise ConfigError(f"{key}.feedback_delay_seconds: must not be negative, got {delay}")
    return Retraining(
        enabled=_bool(raw, "enabled", f"{key}.enabled", True),
        send_feedback_to_models=_bool(
            raw, "send_feedback_to_models", f"{key}.send_feedback_to_models", True
        ),
        feedback_delay_seconds=delay,
    )


def _feedback_queue(value: Any, base: Path | None) -> FeedbackQueueSettings:
    key = "feedback_queue"
    raw = _mapping(value, key)
    _check_keys(
        raw, {"path", "retry_initial_seconds", "retry_max_seconds", "call_timeout_seconds"}, key
    )
    default = FeedbackQueueSettings()
    path = Path(_string(raw, "path", f"{key}.path", str(default.path)))
    if not str(path).strip():
        raise ConfigError(f"{key}.path: must not be empty")
    if not path.is_absolute() and base is not None:
        path = base / path
    values = {}
    for name in ("retry_initial_seconds", "retry_max_seconds", "call_timeout_seconds"):
        number = _number(raw, name, f"{key}.{name}", getattr(default, name))
        if number <= 0:
            raise ConfigError(f"{key}.{name}: must be > 0, got {number}")
        values[name] = number
    if values["retry_max_seconds"] < values["retry_initial_seconds"]:
        raise ConfigError(f"{key}.retry_max_seconds: must be >= retry_initial_seconds")
    return FeedbackQueueSettings(path=path, **values)


def _transport(value: Any) -> Transport:
    key = "transport"
    raw = _mapping(value, key)
    default = Transport()
    names = (
        "keepalive_time_ms",
        "keepalive_timeout_ms",
        "reconnect_backoff_initial_ms",
        "reconnect_backoff_max_ms",
    )
    _check_keys(raw, {"use_stream", *names}, key)
    values: dict[str, Any] = {"use_stream": _bool(raw, "use_stream", f"{key}.use_stream", True)}
    for name in names:
        number = _integer(raw, name, f"{key}.{name}", getattr(default, name))
        if number < 1:
            raise ConfigError(f"{key}.{name}: must be >= 1, got {number}")
        values[name] = number
    if values["keepalive_time_ms"] < 5000:
        raise ConfigError(
            f"{key}.keepalive_time_ms: must be >= 5000 (the servers refuse faster pings)"
        )
    if values["reconnect_backoff_max_ms"] < values["reconnect_backoff_initial_ms"]:
        raise ConfigError(
            f"{key}.reconnect_backoff_max_ms: must be >= reconnect_backoff_initial_ms"
        )
    return Transport(**values)


def _tls(value: Any) -> Tls:
    key = "tls"
    raw = _mapping(value, key)
    _check_keys(raw, {"enabled", "ca_file", "cert_file", "key_file"}, key)
    tls = Tls(
        enabled=_bool(raw, "enabled", f"{key}.enabled", False),
        ca_file=_string(raw, "ca_file", f"{key}.ca_file", ""),
        cert_file=_string(raw, "cert_file", f"{key}.cert_file", ""),
        key_file=_string(raw, "key_file", f"{key}.key_file", ""),
    )
    if tls.enabled:
        raise ConfigError(f"{key}.enabled: TLS towards the model servers is not supported yet")
    return tls


_TOP_KEYS = {
    "model_endpoints",
    "deadline_ms",
    "quorum",
    "thresholds",
    "weights",
    "retraining",
    "feedback_queue",
    "transport",
    "tls",
}


def parse_config(raw: Any, source: Path | None = None) -> Config:
    """Validate a decoded YAML document into a :class:`Config` (raises :class:`ConfigError`)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            "the configuration must be a mapping with at least 'model_endpoints', got "
            f"{type(raw).__name__}"
        )
    raw = _mapping(raw, "")
    _check_keys(raw, _TOP_KEYS, "")
    if "model_endpoints" not in raw:
        raise ConfigError("model_endpoints: required")
    endpoints = _endpoints(raw["model_endpoints"])
    deadline = _number(raw, "deadline_ms", "deadline_ms", 500.0)
    if deadline <= 0:
        raise ConfigError(f"deadline_ms: must be > 0, got {deadline}")
    base = source.parent if source is not None else None
    return Config(
        model_endpoints=endpoints,
        deadline_ms=deadline,
        quorum=_quorum(raw.get("quorum"), sum(e.enabled for e in endpoints)),
        thresholds=_thresholds(raw.get("thresholds")),
        weights=_weights(raw.get("weights")),
        retraining=_retraining(raw.get("retraining")),
        feedback_queue=_feedback_queue(raw.get("feedback_queue"), base),
        transport=_transport(raw.get("transport")),
        tls=_tls(raw.get("tls")),
        source=source,
    )


def load_config(path: Path | str) -> Config:
    """Read and validate a config.yaml (raises :class:`ConfigError` naming the file and key)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_config(raw, source=path.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
