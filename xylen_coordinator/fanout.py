"""One request to every serving endpoint at once, under one deadline.

A server that is not SERVING is not asked; one that fails or has not answered when the deadline
runs out is a missing vote (its late answer is dropped), never a failed fan-out. The caller
decides what the votes are worth (quorum, weights).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator.endpoints import Answer, MissingReason, VoteFailure
from xylen_coordinator.featurize import FEATURES_HASH
from xylen_coordinator.replicas import ReplicaSet
from xylen_coordinator.trust import MAX_MODEL_VERSION, check_answer

#: Missing votes that mean the server did not answer: they count towards its ejection.
_NO_ANSWER = (MissingReason.DEADLINE_EXCEEDED, MissingReason.UNAVAILABLE)


@dataclass(frozen=True)
class Missing:
    """An enabled server that did not vote, and why."""

    server_name: str
    reason: MissingReason
    message: str
    error_reason: str = ""
    """The server's ErrorInfo reason when it answered with an error."""
    code: str = ""
    """The server's status code name when it answered with an error."""


@dataclass
class FanOutResult:
    """The answers of the servers that voted (in endpoint order) and the ones that did not."""

    answers: dict[str, Answer] = field(default_factory=dict)
    missing: list[Missing] = field(default_factory=list)


async def fan_out(
    clients: Sequence[ReplicaSet],
    request: pb.PredictRequest,
    timeout: float,
    featurized: pb.PredictRequest | None = None,
) -> FanOutResult:
    """Send ``request`` to every serving client and collect what arrives within ``timeout``
    seconds. ``featurized`` (the request with its candle windows replaced by their features)
    goes instead to the clients whose server computes the same features."""
    result = FanOutResult()
    asked: list[tuple[ReplicaSet, asyncio.Future[Answer]]] = []
    outcome: dict[str, Answer | Missing] = {}
    for client in clients:
        if not client.serving:
            outcome[client.name] = Missing(
                client.name, MissingReason.NOT_SERVING, client.health_detail
            )
            continue
        if client.breaker.ejected:
            outcome[client.name] = Missing(
                client.name, MissingReason.EJECTED, client.breaker.describe()
            )
            continue
        send = request
        if featurized is not None and client.features_hash == FEATURES_HASH:
            send = featurized
        asked.append((client, client.submit(send, timeout)))
    done: set[asyncio.Future[Answer]] = set()
    rows = len(request.inputs)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # An answer naming a model version not known yet is checked with its server's GetModelInfo
    # as soon as it arrives (a hot swap), within what is left of the deadline.
    confirming: dict[str, asyncio.Task[str | None]] = {}
    for client, future in asked:
        future.add_done_callback(functools.partial(_confirm_unknown, client, rows, confirming))
    if asked:
        try:
            done, _ = await asyncio.wait([future for _, future in asked], timeout=timeout)
            for client, future in asked:  # in case a callback has not run yet
                if future in done:
                    _confirm_unknown(client, rows, confirming, future)
            if confirming:
                await asyncio.wait(confirming.values(), timeout=max(0.0, deadline - loop.time()))
        except asyncio.CancelledError:
            for client, future in asked:
                client.forget(future)
            for task in confirming.values():
                task.cancel()
            raise
    for client, future in asked:
        outcome[client.name] = _collect(
            client, future, future in done, rows, timeout, confirming.get(client.name)
        )
    _account(clients, [client for client, _ in asked], outcome)
    for client in clients:
        item = outcome[client.name]
        if isinstance(item, Missing):
            result.missing.append(item)
        else:
            result.answers[client.name] = item
    return result


def _collect(
    client: ReplicaSet,
    future: asyncio.Future[Answer],
    finished: bool,
    rows: int,
    timeout: float,
    confirmation: asyncio.Task[str | None] | None = None,
) -> Answer | Missing:
    if not finished:
        client.forget(future)
        return Missing(
            client.name,
            MissingReason.DEADLINE_EXCEEDED,
            f"no answer within the {timeout * 1000:.0f} ms deadline",
        )
    if future.cancelled():  # its client was closed under the call: a reload removed the
        # endpoint, or its replica's address left DNS, while the call waited for its answer
        return Missing(
            client.name,
            MissingReason.UNAVAILABLE,
            "the endpoint was closed (removed from the configuration) before it answered",
        )
    error = future.exception()
    if error is None:
        answer = future.result()
        if len(answer.response.predictions) != rows:
            return Missing(
                client.name,
                MissingReason.ERROR,
                f"answered {len(answer.response.predictions)} rows for {rows} inputs",
            )
        rejection = check_answer(answer.response, client.expected_model_name, client.known_versions)
        if rejection is None:
            return answer
        message = rejection.message
        if rejection.reason == "UNKNOWN_MODEL_VERSION" and confirmation is not None:
            if not confirmation.done():
                message += "; GetModelInfo did not answer within the deadline"
            elif (why := confirmation.result()) is not None:
                message += f"; {why}"
        return Missing(client.name, MissingReason.REJECTED, message, rejection.reason)
    if isinstance(error, VoteFailure):
        return Missing(
            client.name,
            error.reason,
            error.message,
            error.error_reason,
            error.code.name if error.code is not None else "",
        )
    return Missing(client.name, MissingReason.ERROR, f"{type(error).__name__}: {error}")


def _confirm_unknown(
    client: ReplicaSet,
    rows: int,
    confirming: dict[str, asyncio.Task[str | None]],
    answered: asyncio.Future[Answer],
) -> None:
    """When ``answered`` carries a model version ``client`` was not told about (and nothing
    else wrong), start asking the server whether it serves that version now (once per call)."""
    if client.name in confirming or answered.cancelled() or answered.exception() is not None:
        return
    predictions = answered.result().response.predictions
    if len(predictions) != rows:
        return
    rejection = check_answer(answered.result().response, client.expected_model_name,
                             client.known_versions)  # fmt: skip
    if rejection is None or rejection.reason != "UNKNOWN_MODEL_VERSION":
        return
    unknown = next((p for p in predictions if p.model_version not in client.known_versions), None)
    if unknown is None or not 1 <= unknown.model_version <= MAX_MODEL_VERSION:
        return  # absurd: no server can confirm it
    confirming[client.name] = asyncio.ensure_future(
        client.confirm_version(unknown.model_name, unknown.model_version)
    )


def _silent(item: Answer | Missing) -> bool:
    return isinstance(item, Missing) and item.reason in _NO_ANSWER


def _account(
    clients: Sequence[ReplicaSet],
    asked: Sequence[ReplicaSet],
    outcome: dict[str, Answer | Missing],
) -> None:
    """Tell each asked server's breaker whether it answered; a server that did not may be
    ejected unless too many endpoints are ejected already.

    A server is an outlier only against peers that answered: when none of the asked servers
    answered in time, the cause is more likely here (an overloaded coordinator, a deadline too
    short for anyone) than in each of them, and nobody's count moves."""
    if all(_silent(outcome[c.name]) for c in asked):
        return
    for client in asked:
        item = outcome[client.name]
        if isinstance(item, Missing) and _silent(item):
            fraction = client.breaker.settings.max_ejected_fraction
            limit = max(1, int(len(clients) * fraction))
            ejected = sum(1 for c in clients if c.breaker.ejected)
            client.breaker.failure(item.message, may_eject=ejected < limit)
        else:
            client.breaker.success()
