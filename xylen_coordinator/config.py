"""The coordinator's configuration: config.yaml, validated into one frozen object.

The file lists the model servers (``model_endpoints``) and how outcomes are handled
(``retraining``, ``feedback_queue``), plus the fan-out settings (deadline, quorum, thresholds,
weights, transport, TLS). Each section is one dataclass below, whose fields are the section's
keys and carry their defaults. Every key is checked at load:
an unknown key, a duplicate endpoint name, a negative or all-zero weight or a bad port raises
:class:`ConfigError` whose message starts with the dotted key, e.g.
``model_endpoints[2].port: must be an integer in 1..65535, got 70000``.

A reload (SIGHUP) builds a new :class:`Config` first and swaps it in only when it is valid, so a
bad file keeps the old configuration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xylen_server.auth import read_token
from xylen_server.errors import SettingsError
from xylen_server.settings import Settings
from xylen_server.tls import ClientTls

#: Largest gRPC message the coordinator sends or receives: the model servers' own default.
MAX_MESSAGE_BYTES = Settings.max_message_bytes


#: Shortest ``feedback_queue.retention_seconds``: a guard against a unit slip (7 meant as days),
#: which would refuse every Feedback that arrives more than seconds after its prediction.
MIN_RETENTION_SECONDS = 3600.0


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
    model_name: str = ""
    """Model the server must name in every vote; a vote naming another is rejected. Empty: the
    name the server gives in GetModelInfo when it turns SERVING."""
    replicas: tuple[str, ...] = ()
    """Optional. The replicas of this model as ``host:port`` addresses (``[::1]:8001`` for IPv6),
    dialled instead of every address ``host`` resolves to. Either way the model has one vote,
    spread over its replicas that are SERVING; ``host`` stays the name checked against their TLS
    certificates."""

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


#: Longest time budget of one fan-out: a caller's timeout, or ``deadline_ms``.
MAX_TIMEOUT_SECONDS = 3600.0

THRESHOLD_SOURCES = ("members", "fixed")


@dataclass(frozen=True)
class Thresholds:
    """Signal thresholds applied to the ensemble probability (same rule as the servers)."""

    buy: float = 0.55
    """P(up) at or above which the signal is BUY (``source: fixed``; with ``members``, the
    value used for a member whose own thresholds are not known)."""
    sell: float = 0.45
    """P(up) at or below which the signal is SELL (as ``buy``)."""
    source: str = "members"
    """``members``: the voters' own thresholds (each chosen on its model's validation data,
    GetModelInfo), weighted like their probabilities, so the ensemble follows the members'
    rule; ``fixed``: ``buy`` and ``sell``."""


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
    """Whether trade outcomes are accepted and forwarded to the models that voted, and when."""

    enabled: bool = True
    """Accept outcomes on Feedback (FAILED_PRECONDITION FEEDBACK_DISABLED when false)."""
    send_feedback_to_models: bool = True
    """Forward each outcome to the Feedback RPC of every model that voted on the prediction."""
    feedback_delay_seconds: float = 60.0
    """Wait this long after receipt before forwarding, >= 0."""


@dataclass(frozen=True)
class FeedbackQueueSettings:
    """Where the outbox of outcomes lives and how its deliveries are retried."""

    path: Path = Path("run/coordinator/feedback.sqlite3")
    """SQLite file (WAL, fsync on commit); relative paths are relative to the config file."""
    retry_initial_seconds: float = 1.0
    """First retry delay after a failed delivery; doubles per attempt. A reload applies it from
    the next failed delivery, as the two below."""
    retry_max_seconds: float = 60.0
    """Longest retry delay."""
    call_timeout_seconds: float = 5.0
    """Deadline of one forwarded Feedback call."""
    retention_seconds: float = 7 * 24 * 3600.0
    """How long the outbox keeps an ensemble prediction (from when it was made) and an outcome
    whose deliveries are all finished (from when it was received), >= 3600; older rows are
    deleted by a sweep every few minutes. It must exceed how late an outcome may arrive after
    its prediction (the longest a trade is held plus the caller's delay in reporting it): a
    Feedback for a prediction the sweep removed is NOT_FOUND (PREDICTION_NOT_FOUND), as one for
    an unknown id. An outcome with a delivery still pending is kept however old it is, while
    the delivery's server is an enabled endpoint; a delivery to a server absent (removed or
    disabled) for longer than this is abandoned, then swept. A reload applies it from the next
    sweep."""


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
    resolve_interval_seconds: float = 30.0
    """How often an endpoint's ``host`` name is resolved again: its replicas are the addresses it
    resolves to (a Kubernetes headless Service: one per ready pod), > 0."""


@dataclass(frozen=True)
class OutlierDetection:
    """Ejecting a server that stops answering, so that it costs one deadline and not every call.

    After ``consecutive_failures`` timeouts or connection failures in a row the server is left
    out (a missing vote, reason EJECTED) for ``base_ejection_seconds``, doubled for each
    ejection in a row up to ``max_ejection_seconds``; then a grpc.health.v1 Check probes it and
    it rejoins when the check answers SERVING within ``probe_timeout_ms`` (on probation: one
    more failure ejects it again; an answer clears its record)."""

    enabled: bool = True
    """False: never eject (every call waits for a hung server until the deadline)."""
    consecutive_failures: int = 3
    """Timeouts or connection failures in a row that eject a server, >= 1."""
    base_ejection_seconds: float = 2.0
    """First ejection period, > 0."""
    max_ejection_seconds: float = 30.0
    """Longest ejection period, >= base_ejection_seconds."""
    probe_timeout_ms: int = 500
    """Deadline of the health probe of an ejected server, >= 1."""
    max_ejected_fraction: float = 0.5
    """Most of the enabled endpoints ejected at once (at least one), in (0, 1]."""


@dataclass(frozen=True)
class Tls:
    """The ``tls`` section: how the coordinator dials the model servers. ``enabled: false``
    (the default) is plaintext; ``true`` needs ``ca_file`` and may add a client certificate and
    key (mutual TLS; both or neither). Relative paths are relative to the config file; every
    file is read and checked at load."""

    enabled: bool = False
    """Dial the model servers over TLS."""
    ca_file: str = ""
    """PEM file of the CA that signed the servers' certificates."""
    cert_file: str = ""
    """PEM client certificate, for mTLS."""
    key_file: str = ""
    """PEM client key, for mTLS."""
    server_name: str = ""
    """Name to check the servers' certificates against instead of each endpoint's host."""

    def client(self) -> ClientTls | None:
        """The channel options of :mod:`xylen_server.tls` (None: plaintext)."""
        if not self.enabled:
            return None
        return ClientTls(
            ca=Path(self.ca_file),
            cert=Path(self.cert_file) if self.cert_file else None,
            key=Path(self.key_file) if self.key_file else None,
            server_name=self.server_name,
        )


@dataclass(frozen=True)
class Auth:
    """The ``auth`` section: the credentials the coordinator presents to the model servers (their
    admin token, for forwarding Feedback, and accepted by their Predict when it is guarded)."""

    token_file: str = ""
    """File holding the bearer token (one line), relative to the config file; empty: none."""
    token: str = field(default="", repr=False, metadata={"in_file": False})
    """The token read from ``token_file`` at load (not a key of the file)."""


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
    """The outbox of outcomes to forward."""
    transport: Transport = field(default_factory=Transport)
    """Channel and stream settings."""
    tls: Tls = field(default_factory=Tls)
    """TLS (and mutual TLS) towards the model servers."""
    auth: Auth = field(default_factory=Auth)
    """Credentials sent to the model servers."""
    outlier_detection: OutlierDetection = field(default_factory=OutlierDetection)
    """When a server that stops answering is left out, and how it rejoins."""
    max_concurrent_predicts: int = 128
    """EnsembleService.Predict calls worked on at once, >= 1; one more is refused at once with
    RESOURCE_EXHAUSTED (reason OVERLOADED) instead of queueing past its deadline."""
    source: Path | None = field(default=None, metadata={"in_file": False})
    """File the configuration was read from, if any (not a key of the file)."""

    @property
    def enabled_endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.model_endpoints if e.enabled)

    def endpoint(self, name: str) -> Endpoint | None:
        return next((e for e in self.model_endpoints if e.name == name), None)


# ---------------------------------------------------------------------------------------------
# Reading the file: each section is read against its dataclass (its keys are the dataclass's
# fields, a key left out takes the field's default) and every message names the dotted key.


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__}")
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(f"{key}: keys must be strings, got {k!r}")
    return value


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


class _Section:
    """One mapping of the file, read against the dataclass ``cls`` it becomes.

    Its keys must be fields of ``cls`` (a field with ``metadata={"in_file": False}`` is not
    one), a field without a default must be given, and a reader returns the file's value, checked
    for its type, or the field's default.
    """

    def __init__(self, value: Any, key: str, cls: type) -> None:
        self.raw = _mapping(value, key)
        self.key = key
        self.fields = {
            f.name: f for f in dataclasses.fields(cls) if f.metadata.get("in_file", True)
        }
        unknown = sorted(set(self.raw) - set(self.fields))
        if unknown:
            allowed = ", ".join(sorted(self.fields))
            raise ConfigError(f"{self.where(unknown[0])}: unknown key (allowed: {allowed})")
        for name, f in self.fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and name not in self.raw:
                raise ConfigError(f"{self.where(name)}: required")

    def where(self, name: str) -> str:
        """The dotted key of ``name`` in this section."""
        return f"{self.key}.{name}" if self.key else name

    def _read(self, name: str, valid: Callable[[Any], bool], must_be: str) -> Any:
        if name not in self.raw:
            f = self.fields[name]
            return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        value = self.raw[name]
        if not valid(value):
            raise ConfigError(f"{self.where(name)}: must be {must_be}, got {value!r}")
        return value

    def number(self, name: str) -> float:
        return float(self._read(name, _is_number, "a finite number"))

    def integer(self, name: str) -> int:
        return int(self._read(name, _is_integer, "an integer"))

    def boolean(self, name: str) -> bool:
        return bool(self._read(name, lambda value: isinstance(value, bool), "true or false"))

    def string(self, name: str) -> str:
        return str(self._read(name, lambda value: isinstance(value, str), "a string"))


def _endpoint(value: Any, key: str) -> Endpoint:
    section = _Section(value, key, Endpoint)
    name = section.string("name")
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ConfigError(
            f"{key}.name: must be a non-empty name of letters, digits, _-., got {name!r}"
        )
    host = section.string("host")
    if not host.strip():
        raise ConfigError(f"{key}.host: must not be empty")
    port = section.raw["port"]
    if not _is_integer(port) or not 1 <= port <= 65535:
        raise ConfigError(f"{key}.port: must be an integer in 1..65535, got {port!r}")
    weight = section.number("weight")
    if weight < 0:
        raise ConfigError(f"{key}.weight: must not be negative, got {weight}")
    if weight > MAX_WEIGHT:
        raise ConfigError(f"{key}.weight: must be at most {MAX_WEIGHT:g} (weights are relative)")
    enabled = section.boolean("enabled")
    model_name = section.string("model_name")
    if len(model_name) > 256:
        raise ConfigError(f"{key}.model_name: must be at most 256 characters")
    return Endpoint(
        name=name,
        host=host.strip(),
        port=port,
        weight=weight,
        enabled=enabled,
        model_name=model_name,
        replicas=_replicas(section.raw.get("replicas", []), f"{key}.replicas"),
    )


#: Most replicas listed for one endpoint.
MAX_REPLICAS = 64
MAX_WEIGHT = 1e6
"""Largest endpoint weight and adaptive cap: weights are relative (renormalised over the
servers that voted), and with both at most this every weighted sum the ensemble forms stays
finite (two weights of 1e308 overflowed it to OverflowError)."""


def split_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``[v6]:port``; None when it is neither."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None  # an IPv6 literal needs its brackets
    if not host or any(c.isspace() for c in host) or "[" in host or "]" in host:
        return None
    return host, int(port)


def _replicas(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_REPLICAS:
        raise ConfigError(f"{key}: must be a list of at most {MAX_REPLICAS} host:port addresses")
    seen: set[str] = set()
    for i, address in enumerate(value):
        if not isinstance(address, str) or len(address) > 300 or split_address(address) is None:
            shown = repr(address)[:60]
            raise ConfigError(f"{key}[{i}]: must be host:port ([v6]:port for IPv6), got {shown}")
        if address in seen:
            raise ConfigError(f"{key}[{i}]: {address} is listed twice")
        seen.add(address)
    return tuple(value)


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
    section = _Section(value, key, Quorum)
    fraction = section.number("min_weight_fraction")
    if not 0 < fraction <= 1:
        raise ConfigError(f"{key}.min_weight_fraction: must be in (0, 1], got {fraction}")
    votes = section.integer("min_votes")
    if not 1 <= votes <= n_enabled:
        raise ConfigError(
            f"{key}.min_votes: must be in 1..{n_enabled} (the enabled endpoints), got {votes}"
        )
    return Quorum(min_weight_fraction=fraction, min_votes=votes)


def _thresholds(value: Any) -> Thresholds:
    key = "thresholds"
    section = _Section(value, key, Thresholds)
    buy = section.number("buy")
    sell = section.number("sell")
    if not 0 <= sell < buy <= 1:
        raise ConfigError(f"{key}: need 0 <= sell < buy <= 1, got sell={sell} buy={buy}")
    source = section.string("source")
    if source not in THRESHOLD_SOURCES:
        raise ConfigError(
            f"{key}.source: must be one of {', '.join(THRESHOLD_SOURCES)}, got {source[:40]!r}"
        )
    return Thresholds(buy=buy, sell=sell, source=source)


def _weights(value: Any) -> Weights:
    key = "weights"
    section = _Section(value, key, Weights)
    mode = section.string("mode")
    if mode not in ("static", "adaptive"):
        raise ConfigError(f"{key}.mode: must be 'static' or 'adaptive', got {mode!r}")
    return Weights(mode=mode, adaptive=_adaptive(section.raw.get("adaptive")))


def _adaptive(value: Any) -> Adaptive:
    key = "weights.adaptive"
    section = _Section(value, key, Adaptive)
    metric = section.string("metric")
    if metric not in ("brier", "hit_rate"):
        raise ConfigError(f"{key}.metric: must be 'brier' or 'hit_rate', got {metric!r}")
    half_life = section.number("half_life_outcomes")
    if half_life <= 0:
        raise ConfigError(f"{key}.half_life_outcomes: must be > 0, got {half_life}")
    min_outcomes = section.number("min_outcomes")
    if min_outcomes < 0:
        raise ConfigError(f"{key}.min_outcomes: must not be negative, got {min_outcomes}")
    # Decayed counts saturate at 1 / (1 - d): a minimum at or above that is never reached.
    ceiling = 1.0 / (1.0 - 0.5 ** (1.0 / half_life))
    if min_outcomes >= ceiling:
        raise ConfigError(
            f"{key}.min_outcomes: must be below {ceiling:.1f}, the most effective outcomes a "
            f"half-life of {half_life:g} can hold, got {min_outcomes:g}"
        )
    floor = section.number("floor")
    cap = section.number("cap")
    if floor <= 0:
        raise ConfigError(f"{key}.floor: must be > 0, got {floor}")
    if cap < floor:
        raise ConfigError(f"{key}.cap: must be >= floor ({floor}), got {cap}")
    if cap > MAX_WEIGHT:
        raise ConfigError(f"{key}.cap: must be at most {MAX_WEIGHT:g}, got {cap:g}")
    return Adaptive(metric, half_life, min_outcomes, floor, cap)


def _retraining(value: Any) -> Retraining:
    key = "retraining"
    section = _Section(value, key, Retraining)
    delay = section.number("feedback_delay_seconds")
    if delay < 0:
        raise ConfigError(f"{key}.feedback_delay_seconds: must not be negative, got {delay}")
    return Retraining(
        enabled=section.boolean("enabled"),
        send_feedback_to_models=section.boolean("send_feedback_to_models"),
        feedback_delay_seconds=delay,
    )


def _feedback_queue(value: Any, base: Path | None) -> FeedbackQueueSettings:
    key = "feedback_queue"
    section = _Section(value, key, FeedbackQueueSettings)
    path = Path(section.string("path"))
    if not str(path).strip():
        raise ConfigError(f"{key}.path: must not be empty")
    if not path.is_absolute() and base is not None:
        path = base / path
    values = {}
    for name in ("retry_initial_seconds", "retry_max_seconds", "call_timeout_seconds"):
        number = section.number(name)
        if number <= 0:
            raise ConfigError(f"{key}.{name}: must be > 0, got {number}")
        values[name] = number
    if values["retry_max_seconds"] < values["retry_initial_seconds"]:
        raise ConfigError(f"{key}.retry_max_seconds: must be >= retry_initial_seconds")
    retention = section.number("retention_seconds")
    if retention < MIN_RETENTION_SECONDS:
        raise ConfigError(
            f"{key}.retention_seconds: must be >= {MIN_RETENTION_SECONDS:g} (an hour; a "
            f"Feedback later than this after its prediction is refused), got {retention:g}"
        )
    return FeedbackQueueSettings(path=path, retention_seconds=retention, **values)


def _transport(value: Any) -> Transport:
    key = "transport"
    section = _Section(value, key, Transport)
    values: dict[str, Any] = {"use_stream": section.boolean("use_stream")}
    for name in (
        "keepalive_time_ms",
        "keepalive_timeout_ms",
        "reconnect_backoff_initial_ms",
        "reconnect_backoff_max_ms",
    ):
        number = section.integer(name)
        if number < 1:
            raise ConfigError(f"{key}.{name}: must be >= 1, got {number}")
        values[name] = number
    interval = section.number("resolve_interval_seconds")
    if interval <= 0:
        raise ConfigError(f"{key}.resolve_interval_seconds: must be > 0, got {interval}")
    values["resolve_interval_seconds"] = interval
    if values["keepalive_time_ms"] < 5000:
        raise ConfigError(
            f"{key}.keepalive_time_ms: must be >= 5000 (the servers refuse faster pings)"
        )
    if values["reconnect_backoff_max_ms"] < values["reconnect_backoff_initial_ms"]:
        raise ConfigError(
            f"{key}.reconnect_backoff_max_ms: must be >= reconnect_backoff_initial_ms"
        )
    return Transport(**values)


def _relative(name: str, base: Path | None) -> str:
    if not name or base is None or Path(name).is_absolute():
        return name
    return str(base / name)


def _tls(value: Any, base: Path | None) -> Tls:
    key = "tls"
    section = _Section(value, key, Tls)
    tls = Tls(
        enabled=section.boolean("enabled"),
        ca_file=_relative(section.string("ca_file"), base),
        cert_file=_relative(section.string("cert_file"), base),
        key_file=_relative(section.string("key_file"), base),
        server_name=section.string("server_name"),
    )
    if not tls.enabled:
        return tls
    if not tls.ca_file:
        raise ConfigError(f"{key}.ca_file: required when tls.enabled is true")
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigError(f"{key}.cert_file: a client certificate and key_file go together")
    client = tls.client()
    assert client is not None
    try:
        client.credentials()  # every file readable and PEM, now rather than at the first call
    except SettingsError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return tls


def _outlier_detection(value: Any) -> OutlierDetection:
    key = "outlier_detection"
    section = _Section(value, key, OutlierDetection)
    failures = section.integer("consecutive_failures")
    if failures < 1:
        raise ConfigError(f"{key}.consecutive_failures: must be >= 1, got {failures}")
    base = section.number("base_ejection_seconds")
    if base <= 0:
        raise ConfigError(f"{key}.base_ejection_seconds: must be > 0, got {base}")
    longest = section.number("max_ejection_seconds")
    if longest < base:
        raise ConfigError(f"{key}.max_ejection_seconds: must be >= base_ejection_seconds")
    probe = section.integer("probe_timeout_ms")
    if probe < 1:
        raise ConfigError(f"{key}.probe_timeout_ms: must be >= 1, got {probe}")
    fraction = section.number("max_ejected_fraction")
    if not 0 < fraction <= 1:
        raise ConfigError(f"{key}.max_ejected_fraction: must be in (0, 1], got {fraction}")
    return OutlierDetection(
        enabled=section.boolean("enabled"),
        consecutive_failures=failures,
        base_ejection_seconds=base,
        max_ejection_seconds=longest,
        probe_timeout_ms=probe,
        max_ejected_fraction=fraction,
    )


def _max_concurrent(section: _Section) -> int:
    value = section.integer("max_concurrent_predicts")
    if value < 1:
        raise ConfigError(f"max_concurrent_predicts: must be >= 1, got {value}")
    return value


def _auth(value: Any, base: Path | None) -> Auth:
    key = "auth"
    section = _Section(value, key, Auth)
    token_file = _relative(section.string("token_file"), base)
    if not token_file:
        return Auth()
    try:
        token = read_token("", Path(token_file), "auth.token")
    except SettingsError as exc:
        raise ConfigError(f"{key}.token_file: {exc}") from None
    return Auth(token_file=token_file, token=token)


def parse_config(raw: Any, source: Path | None = None) -> Config:
    """Validate a decoded YAML document into a :class:`Config` (raises :class:`ConfigError`)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            "the configuration must be a mapping with at least 'model_endpoints', got "
            f"{type(raw).__name__}"
        )
    section = _Section(raw, "", Config)
    endpoints = _endpoints(section.raw["model_endpoints"])
    deadline = section.number("deadline_ms")
    if not 0 < deadline <= MAX_TIMEOUT_SECONDS * 1000:
        raise ConfigError(
            f"deadline_ms: must be > 0 and at most {MAX_TIMEOUT_SECONDS * 1000:g} (an hour), "
            f"got {deadline:g}"
        )
    base = source.parent if source is not None else None
    return Config(
        model_endpoints=endpoints,
        deadline_ms=deadline,
        quorum=_quorum(section.raw.get("quorum"), sum(e.enabled for e in endpoints)),
        thresholds=_thresholds(section.raw.get("thresholds")),
        weights=_weights(section.raw.get("weights")),
        retraining=_retraining(section.raw.get("retraining")),
        feedback_queue=_feedback_queue(section.raw.get("feedback_queue"), base),
        transport=_transport(section.raw.get("transport")),
        tls=_tls(section.raw.get("tls"), base),
        auth=_auth(section.raw.get("auth"), base),
        outlier_detection=_outlier_detection(section.raw.get("outlier_detection")),
        max_concurrent_predicts=_max_concurrent(section),
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
