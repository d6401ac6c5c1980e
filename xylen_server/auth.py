"""Who may call what: bearer tokens and mTLS identities, checked by one server interceptor.

Three kinds of RPC (:func:`method_kind`):

* **admin**: the state-changing ones, ``ModelService`` Feedback, Retrain, RollbackModel and
  ReloadModel, and ``EnsembleService`` Feedback. They need the admin token
  (``ADMIN_TOKEN`` / ``ADMIN_TOKEN_FILE``, sent as ``authorization: Bearer <token>`` and
  compared with :func:`hmac.compare_digest`) or a verified mTLS client certificate whose subject
  CN or a SAN is in ``ADMIN_IDENTITIES``. With neither configured the admin RPCs are *open*:
  allowed only on a loopback address, behind mutual TLS, or with ``ALLOW_INSECURE_ADMIN=true``
  (:func:`check_exposure` stops the process at start otherwise).
* **read**: every other xylen RPC (Predict, PredictStream, GetModelInfo, WatchRetrain,
  ListModelVersions, GetEnsembleInfo), and the Open Inference Protocol's ModelInfer,
  ModelReady, ModelMetadata and ServerMetadata. Open unless ``PREDICT_TOKEN`` is set; then they
  need it (or the admin credentials).
* **open**: grpc.health.v1, reflection and the Open Inference Protocol's ServerLive and
  ServerReady, so probes and grpcurl keep working.

A call without credentials where they are needed is UNAUTHENTICATED (reason
``MISSING_CREDENTIALS``); a wrong token, a predict token on an admin RPC or a certificate
identity not allowed is PERMISSION_DENIED (``INVALID_TOKEN``, ``TOKEN_NOT_ADMIN``,
``IDENTITY_NOT_ALLOWED``). Refusals are logged with the method, the peer and the reason, never
with the token sent or configured; at most one line per method and reason every
:data:`DENIAL_LOG_SECONDS` (the next line counts the ones left out), so a flood of refused
calls cannot fill the disk. Every refusal is also counted by the metrics interceptor.

The caller of an admin RPC is known to the handler as :func:`caller`: ``token:admin``,
``mtls:<identity>`` or :data:`ANONYMOUS`. Feedback stores it with the sample, and the retrain
gate scores candidates only on samples from authenticated callers (see
:mod:`xylen_server.learning.job.run`).

Clients send the token with :func:`bearer_metadata` (per call) or :class:`TokenInterceptor` (a
blocking channel that adds it to every call).
"""

from __future__ import annotations

import contextvars
import hmac
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from xylen_server.errors import (
    HandlerInterceptor,
    PermissionDenied,
    SettingsError,
    Unauthenticated,
    wrap_behaviors,
)

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
"""The caller of an open admin RPC who presented no credential (stored with its feedback)."""
ADMIN_TOKEN_IDENTITY = "token:admin"
"""The caller who presented the admin token."""

DENIAL_LOG_SECONDS = 10.0
"""One log line per method and refusal reason at most this often."""
AUTHORIZATION = "authorization"
MAX_TOKEN_BYTES = 4096
"""Longest token read from a file or the environment."""

ADMIN_METHODS = frozenset(
    {
        "/xylen.v1.ModelService/Feedback",
        "/xylen.v1.ModelService/Retrain",
        "/xylen.v1.ModelService/RollbackModel",
        "/xylen.v1.ModelService/ReloadModel",
        "/xylen.v1.EnsembleService/Feedback",
    }
)
"""Admin and state-changing RPCs: they need the admin credentials."""
_GUARDED_PREFIX = "/xylen.v1."
INFERENCE_READ_METHODS = frozenset(
    f"/inference.GRPCInferenceService/{name}"
    for name in ("ModelReady", "ModelMetadata", "ModelInfer", "ServerMetadata")
)
"""The Open Inference Protocol's RPCs that say something about the model or run it: read, like
Predict; its ServerLive and ServerReady stay open, like grpc.health.v1."""

CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("xylen_caller", default=ANONYMOUS)
"""Who makes the call being handled; set by the interceptor that checked the credentials."""


def caller() -> str:
    """Who makes the admin call being handled (``token:admin``, ``mtls:<name>``, anonymous)."""
    return CALLER.get()


def run_as(handler: grpc.RpcMethodHandler, source: Callable[[Any], str]) -> grpc.RpcMethodHandler:
    """``handler`` with :data:`CALLER` set to ``source(context)`` for the whole call (unary or
    streaming): the credentials check of :class:`AuthInterceptor`, or the caller a worker of
    the same server forwarded after its own check (``xylen_server.server``). ``source`` may
    raise to refuse the call."""

    def unary(behavior: Any) -> Any:
        async def run(request: Any, context: Any) -> Any:
            reset = CALLER.set(source(context))
            try:
                return await behavior(request, context)
            finally:
                CALLER.reset(reset)

        return run

    def streaming(behavior: Any) -> Any:
        async def run(request: Any, context: Any) -> Any:
            reset = CALLER.set(source(context))
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                CALLER.reset(reset)

        return run

    return wrap_behaviors(handler, unary, streaming)


def is_trusted(source: str | None) -> bool:
    """Whether a sample from ``source`` came from an authenticated caller."""
    return bool(source) and source != ANONYMOUS


def method_kind(method: str) -> str:
    """``admin``, ``read`` or ``open`` for a full method name (see the module docstring)."""
    if method in ADMIN_METHODS:
        return "admin"
    if method.startswith(_GUARDED_PREFIX) or method in INFERENCE_READ_METHODS:
        return "read"
    return "open"


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(value: str, file: Path | None, var: str) -> str:
    """The token given directly (``value``) or in ``file`` (its first line), "" if neither;
    SettingsError naming ``var`` when both are set or the file is unusable."""
    if value and file is not None:
        raise SettingsError(f"set {var} or {var}_FILE, not both")
    if file is not None:
        try:
            with open(file, "rb") as handle:
                raw = handle.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise SettingsError(f"{var}_FILE: cannot read {file}: {exc.strerror or exc}") from None
        lines = raw.decode("utf-8", "replace").strip().splitlines()
        value = lines[0].strip() if lines else ""
        if not value:
            raise SettingsError(f"{var}_FILE: {file} holds no token")
    value = value.strip()
    if len(value.encode()) > MAX_TOKEN_BYTES:
        raise SettingsError(f"{var}: longer than {MAX_TOKEN_BYTES} bytes")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise SettingsError(f"{var}: a token may not hold spaces or control characters")
    return value


@dataclass(frozen=True)
class ServerSecurity:
    """What a server demands of its callers (built from the settings at start)."""

    admin_token: str = ""
    predict_token: str = ""
    admin_identities: frozenset[str] = frozenset()
    tls: bool = False
    mtls: bool = False
    allow_insecure_admin: bool = False

    def __repr__(self) -> str:  # never the tokens
        return (
            f"ServerSecurity(admin_token={'set' if self.admin_token else 'unset'}, "
            f"predict_token={'set' if self.predict_token else 'unset'}, "
            f"admin_identities={sorted(self.admin_identities)}, tls={self.tls}, "
            f"mtls={self.mtls}, allow_insecure_admin={self.allow_insecure_admin})"
        )

    @classmethod
    def from_settings(cls, settings: Any) -> ServerSecurity:
        """From a :class:`~xylen_server.settings.Settings` (reads the token files)."""
        identities = frozenset(
            name.strip() for name in settings.admin_identities.split(",") if name.strip()
        )
        security = cls(
            admin_token=read_token(settings.admin_token, settings.admin_token_file, "ADMIN_TOKEN"),
            predict_token=read_token(
                settings.predict_token, settings.predict_token_file, "PREDICT_TOKEN"
            ),
            admin_identities=identities,
            tls=settings.tls_cert_file is not None,
            mtls=settings.tls_client_ca_file is not None,
            allow_insecure_admin=settings.allow_insecure_admin,
        )
        if identities and not security.mtls:
            raise SettingsError(
                "ADMIN_IDENTITIES needs TLS_CLIENT_CA_FILE: identities come from verified "
                "client certificates"
            )
        if security.predict_token and security.admin_open:
            raise SettingsError(
                "PREDICT_TOKEN without ADMIN_TOKEN or ADMIN_IDENTITIES would leave the admin "
                "RPCs more open than Predict"
            )
        if security.predict_token and security.predict_token == security.admin_token:
            raise SettingsError("PREDICT_TOKEN must differ from ADMIN_TOKEN")
        return security

    @property
    def admin_open(self) -> bool:
        """No admin credential is configured: anyone who reaches the port may call them."""
        return not self.admin_token and not self.admin_identities


def check_exposure(security: ServerSecurity, host: str) -> None:
    """SettingsError if the admin RPCs would be open to anyone on a non-loopback ``host``
    (no token, no identities, no mutual TLS) and ``ALLOW_INSECURE_ADMIN`` is not set."""
    if not security.admin_open or security.mtls or security.allow_insecure_admin:
        return
    if is_loopback(host):
        return
    raise SettingsError(
        f"refusing to serve the admin RPCs (Feedback, Retrain, RollbackModel, ReloadModel) "
        f"without credentials on {host[:64]}: set ADMIN_TOKEN or ADMIN_TOKEN_FILE, use mutual "
        "TLS (TLS_CLIENT_CA_FILE), bind a loopback address, or set ALLOW_INSECURE_ADMIN=true"
    )


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of the call's ``authorization`` header; None when there is none, "" when the
    header is not ``Bearer <token>``."""
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def peer_names(context: Any) -> list[str]:
    """The verified client certificate's subject CN and SANs (empty without mutual TLS)."""
    try:
        auth = context.auth_context()
    except Exception:
        return []
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            name = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if name and name not in names:
                names.append(name)
    return names


def _same(given: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


class AuthInterceptor(HandlerInterceptor):
    """Checks every guarded call's credentials before its handler runs (module docstring)."""

    def __init__(self, security: ServerSecurity, log_every: float = DENIAL_LOG_SECONDS) -> None:
        super().__init__()
        self.security = security
        self.log_every = log_every
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}
        """(method, reason) -> (when it was last logged, refusals left out since)."""

    def _log_denial(self, method: str, peer: str, exc: Unauthenticated | PermissionDenied) -> None:
        key = (method, exc.reason)
        now = time.monotonic()
        last, left_out = self._logged.get(key, (-math.inf, 0))
        if now - last < self.log_every:
            self._logged[key] = (last, left_out + 1)
            return
        self._logged[key] = (now, 0)
        more = f" (+{left_out} more since the last line)" if left_out else ""
        logger.warning(
            "denied %s to %s: %s %s%s", method, peer[:80], exc.code.name, exc.reason, more
        )

    def authenticate(self, kind: str, context: Any) -> str:
        """The caller's identity, or raise Unauthenticated / PermissionDenied."""
        security = self.security
        token = _bearer(context.invocation_metadata())
        names = peer_names(context) if security.mtls else []
        if kind == "admin" and security.admin_open:
            return f"mtls:{names[0]}" if names else ANONYMOUS
        if token is not None:
            if _same(token, security.admin_token):
                return ADMIN_TOKEN_IDENTITY
            if kind == "read" and _same(token, security.predict_token):
                return "token:predict"
            if kind == "admin" and _same(token, security.predict_token):
                raise PermissionDenied(
                    "the predict token does not allow admin RPCs", reason="TOKEN_NOT_ADMIN"
                )
            raise PermissionDenied("the bearer token is not valid", reason="INVALID_TOKEN")
        allowed = [name for name in names if name in security.admin_identities]
        if allowed:
            return f"mtls:{allowed[0]}"
        if names:
            raise PermissionDenied(
                f"client certificate {names[0][:64]!r} is not allowed this RPC",
                reason="IDENTITY_NOT_ALLOWED",
            )
        raise Unauthenticated(
            "this RPC needs credentials: 'authorization: Bearer <token>' or an allowed mTLS "
            "client certificate"
        )

    def guards(self, kind: str) -> bool:
        """Whether calls of ``kind`` (:func:`method_kind`) have credentials to check."""
        return not (kind == "open" or (kind == "read" and not self.security.predict_token))

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kind = method_kind(method)
        if not self.guards(kind):
            return handler  # nothing to check: no cost on the hot path
        return run_as(handler, self.checker(method, kind))

    def checker(self, method: str, kind: str) -> Callable[[Any], str]:
        """The check of one method's calls: the caller's identity, or the refusal (logged)."""

        def check(context: Any) -> str:
            try:
                return self.authenticate(kind, context)
            except (Unauthenticated, PermissionDenied) as exc:
                self._log_denial(method, str(context.peer()), exc)
                raise

        return check


# -- clients ---------------------------------------------------------------------------------


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty for no token)."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds ``authorization: Bearer <token>`` to every call of a blocking channel
    (``grpc.intercept_channel(channel, TokenInterceptor(token))``)."""

    def __init__(self, token: str) -> None:
        self.metadata = bearer_metadata(token)

    def _details(self, details: Any) -> _Details:
        metadata = [*(details.metadata or ()), *self.metadata]
        return _Details(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def with_token(channel: grpc.Channel, token: str) -> grpc.Channel:
    """``channel`` sending ``token`` with every call (unchanged for no token)."""
    return grpc.intercept_channel(channel, TokenInterceptor(token)) if token else channel
