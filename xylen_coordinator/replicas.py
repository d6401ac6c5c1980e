"""One model as the coordinator sees it: one vote, spread over the model's replicas.

A :class:`ReplicaSet` stands where a single model server stood (the fan-out, the ensemble and
the feedback forwarder talk to it as they talked to an :class:`EndpointClient`), and holds one
:class:`EndpointClient` per replica, so everything the coordinator does per server it keeps doing
per replica: a long-lived channel, a grpc.health.v1 ``Watch``, a multiplexed ``PredictStream``,
the model versions it confirmed, and its own outlier ejection.

* The replicas are the endpoint's ``replicas`` addresses, or every address its ``host`` resolves
  to, resolved again every ``transport.resolve_interval_seconds`` (sooner while none serves): a
  Kubernetes headless Service lists one address per ready pod. An IP literal is one replica.
* Each request goes to the next replica that is SERVING and not ejected (round robin). One that
  fails to connect or loses its connection before answering (UNAVAILABLE) hands the request to
  the next one within the same deadline, so a replica that dies costs no vote; a replica that
  does not answer in time counts towards its own ejection (never the last one standing).
* Model versions: each replica learns its own (GetModelInfo); a vote naming a version not known
  yet is confirmed with the replica that gave it. Feedback goes to the replica that made the
  prediction while it serves, else to another one (the forwarder then sends the features).

Why not grpc's own ``dns:///`` target with the ``round_robin`` policy: it balances calls, but
the coordinator's one ``PredictStream`` per server would sit on one replica, the health watch
and GetModelInfo would follow whichever replica a call lands on, and no replica could be
ejected on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import socket
from collections import OrderedDict
from collections.abc import Sequence

from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator.breaker import Breaker
from xylen_coordinator.config import Endpoint, OutlierDetection, Transport, split_address
from xylen_coordinator.endpoints import Answer, EndpointClient, MissingReason, VoteFailure
from xylen_coordinator.metrics import Metrics
from xylen_server.tls import ClientTls

logger = logging.getLogger(__name__)

#: Prediction ids whose replica is remembered (for Feedback), most recent first out last.
OWNERS_KEPT = 65_536
#: Seconds a removed replica keeps its channel for the calls still in flight on it.
RETIRE_GRACE_SECONDS = 2.0
#: Re-resolution delay while no replica is SERVING (capped by resolve_interval_seconds).
RESOLVE_RETRY_SECONDS = 1.0


def format_address(host: str, port: int) -> str:
    """``host:port`` as gRPC dials it (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA), in the resolver's order, deduplicated."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = format_address(str(sockaddr[0]), port)
        if address not in addresses:
            addresses.append(address)
    return addresses


class ReplicaSet:
    """The coordinator's connections to the replicas of one model (one vote)."""

    def __init__(
        self,
        endpoint: Endpoint,
        transport: Transport,
        tls: ClientTls | None = None,
        token: str = "",
        *,
        outlier_detection: OutlierDetection | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.name = endpoint.name
        self.transport = transport
        self.tls = tls
        self.token = token
        self.metrics = metrics or Metrics()
        self._outlier = outlier_detection or OutlierDetection()
        self.replicas: dict[str, EndpointClient] = {}
        """The replicas by address, in the order they were found."""
        self._replica_metrics = Metrics()  # a replica's ejections are not the model's
        self.breaker = Breaker(
            self.name,
            self._outlier,
            self._probe,
            on_eject=lambda: self.metrics.ejected(self.name),
            on_rejoin=lambda: self.metrics.rejoined(self.name),
        )
        """The model's own ejection (no replica answered), driven by the fan-out."""
        self.health_known = asyncio.Event()
        self.resolve_detail = "not resolved yet"
        self._turn = 0
        self._inflight: dict[asyncio.Future[Answer], tuple[EndpointClient, asyncio.Future[Answer]]]
        self._inflight = {}
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._answered_version: dict[tuple[str, int], str] = {}
        self._version_answerer: dict[int, str] = {}
        self._maintain: asyncio.Task[None] | None = None
        self._retiring: dict[asyncio.Task[None], EndpointClient] = {}

    # -- replicas ---------------------------------------------------------------------------

    def _fixed_addresses(self) -> list[str] | None:
        """The replicas when nothing needs resolving (listed, or an IP literal host)."""
        if self.endpoint.replicas:
            return list(self.endpoint.replicas)
        if is_ip(self.endpoint.host):
            return [format_address(self.endpoint.host, self.endpoint.port)]
        return None

    def start(self) -> None:
        """Connect to the replicas (resolving the host name in the background; idempotent)."""
        if self._maintain is not None:
            return
        fixed = self._fixed_addresses()
        if fixed is not None:
            self._update(fixed)
        self._maintain = asyncio.create_task(
            self._follow(resolving=fixed is None), name=f"replicas-{self.name}"
        )

    async def _follow(self, resolving: bool) -> None:
        first = True
        while True:
            if resolving:
                try:
                    addresses = await resolve(self.endpoint.host, self.endpoint.port)
                except (OSError, UnicodeError) as error:
                    self.resolve_detail = f"cannot resolve {self.endpoint.host!r}: {error}"[:200]
                    logger.warning("%s: %s", self.name, self.resolve_detail)
                else:
                    self.resolve_detail = f"{self.endpoint.host!r} resolves to no address"
                    self._update(addresses)
            if first:
                first = False
                waits = [
                    asyncio.ensure_future(r.health_known.wait()) for r in self.replicas.values()
                ]
                if waits:
                    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    for task in pending:
                        task.cancel()
                self.health_known.set()
            if not resolving:
                return
            interval = self.transport.resolve_interval_seconds
            if not self.serving:
                interval = min(interval, RESOLVE_RETRY_SECONDS)
            await asyncio.sleep(interval)

    def _update(self, addresses: Sequence[str]) -> None:
        """Connect to new addresses, retire the replicas that are no longer listed."""
        if not addresses:
            return  # a resolver hiccup: keep what there is
        for address in addresses:
            if address in self.replicas:
                continue
            split = split_address(address)
            if split is None:
                continue
            host, port = split
            tls = self.tls
            if tls is not None and not tls.server_name and host != self.endpoint.host:
                # A resolved address: its certificate names the endpoint's host.
                tls = dataclasses.replace(tls, server_name=self.endpoint.host)
            replica = EndpointClient(
                dataclasses.replace(self.endpoint, host=host, port=port, replicas=()),
                self.transport,
                tls,
                self.token,
                outlier_detection=self._outlier,
                metrics=self._replica_metrics,
                on_serving=self._replica_serving,
            )
            replica.breaker.name = f"{self.name} replica {address}"
            replica.start()
            self.replicas[address] = replica
            if len(self.replicas) > 1 or len(addresses) > 1:
                logger.info("%s: replica %s added", self.name, address)
        for address in [a for a in self.replicas if a not in addresses]:
            replica = self.replicas.pop(address)
            logger.info("%s: replica %s removed", self.name, address)
            task = asyncio.create_task(self._retire(replica), name=f"retire-{self.name}")
            self._retiring[task] = replica
            task.add_done_callback(self._retiring.pop)

    def _replica_serving(self) -> None:
        """A replica turned SERVING (started, restarted, reconnected): an ejected model is let
        back in at once, as a single server was."""
        if self.breaker.ejected:
            logger.warning("%s rejoined: a replica's health turned SERVING", self.name)
            self.breaker.reset()

    async def _retire(self, replica: EndpointClient) -> None:
        await asyncio.sleep(RETIRE_GRACE_SECONDS)
        await replica.close(grace=0.5)

    def set_outlier_detection(self, settings: OutlierDetection) -> None:
        """New outlier-detection settings (a reload) for the model and each replica."""
        self._outlier = settings
        for breaker in [self.breaker, *(r.breaker for r in self.replicas.values())]:
            breaker.settings = settings
            if not settings.enabled:
                breaker.reset()

    def _candidates(self, tried: Sequence[EndpointClient] = ()) -> list[EndpointClient]:
        serving = [r for r in self.replicas.values() if r.serving and r not in tried]
        return [r for r in serving if not r.breaker.ejected] or serving

    def _pick(self, tried: Sequence[EndpointClient] = ()) -> EndpointClient | None:
        """The next replica in turn among those SERVING and not ejected (ejected ones only when
        nothing else serves); None when none serves."""
        candidates = self._candidates(tried)
        if not candidates:
            return None
        self._turn += 1
        return candidates[self._turn % len(candidates)]

    def _may_eject(self, replica: EndpointClient) -> bool:
        """A replica is ejected only while another one stays in."""
        return any(
            r is not replica and r.serving and not r.breaker.ejected for r in self.replicas.values()
        )

    # -- what the fan-out and the ensemble read ---------------------------------------------

    @property
    def serving(self) -> bool:
        """At least one replica is SERVING."""
        return any(r.serving for r in self.replicas.values())

    @property
    def health_detail(self) -> str:
        replicas = list(self.replicas.values())
        if not replicas:
            return self.resolve_detail
        if len(replicas) == 1:
            return replicas[0].health_detail
        serving = sum(r.serving for r in replicas)
        detail = f"{serving} of {len(replicas)} replicas SERVING"
        down = next((r for r in replicas if not r.serving), None)
        if down is not None:
            detail += f" ({down.endpoint.address}: {down.health_detail})"
        return detail[:300]

    def _informed(self) -> EndpointClient | None:
        """A replica whose model info is known, SERVING ones first."""
        return next((r for r in self._serving_first() if r.info is not None), None)

    @property
    def info(self) -> pb.ModelInfo | None:
        replica = self._informed()
        return None if replica is None else replica.info

    @property
    def features_hash(self) -> str:
        """The serving replicas' features hash when they all agree (else empty: candles)."""
        hashes = {r.features_hash for r in self.replicas.values() if r.serving}
        return hashes.pop() if len(hashes) == 1 else ""

    @property
    def label(self) -> tuple[int, float, float] | None:
        replica = self._informed()
        return None if replica is None else replica.label

    @property
    def thresholds(self) -> tuple[float, float] | None:
        replica = self._informed()
        return None if replica is None else replica.thresholds

    @property
    def known_versions(self) -> set[int]:
        """The model versions any replica reported (a rolling update serves two at once)."""
        return set().union(*(r.known_versions for r in self.replicas.values()))

    @property
    def expected_model_name(self) -> str:
        if self.endpoint.model_name:
            return self.endpoint.model_name
        return next(
            (r.reported_model_name for r in self._serving_first() if r.reported_model_name), ""
        )

    def _serving_first(self) -> list[EndpointClient]:
        return sorted(self.replicas.values(), key=lambda r: not r.serving)

    @property
    def learning(self) -> bool:
        return any(r.learning for r in self.replicas.values())

    async def learnt(self, timeout: float) -> None:
        await asyncio.gather(*(r.learnt(timeout) for r in self.replicas.values()))

    def notice_version(self, version: int) -> None:
        """Tell the replica that last answered with ``version`` (a counted vote): it learns its
        model info again when that is not the version it knows."""
        address = self._version_answerer.get(version)
        replica = self.replicas.get(address) if address is not None else None
        if replica is not None:
            replica.notice_version(version)

    async def confirm_version(self, name: str, version: int) -> str | None:
        """Ask the replica that answered with ``version`` (or, not known, every serving one:
        one confirming is enough) whether it serves it; None when it does."""
        address = self._answered_version.get((name, version))
        replica = self.replicas.get(address) if address is not None else None
        if replica is not None:
            return await replica.confirm_version(name, version)
        asked = [r for r in self.replicas.values() if r.serving]
        if not asked:
            return "no replica is serving"
        results = await asyncio.gather(*(r.confirm_version(name, version) for r in asked))
        if any(why is None for why in results):
            return None
        return results[0]

    # -- requests ---------------------------------------------------------------------------

    def submit(self, request: pb.PredictRequest, timeout: float) -> asyncio.Future[Answer]:
        """Send ``request`` to the next replica; the future resolves to its :class:`Answer` or
        a :class:`VoteFailure` (another replica's, when the first could not be reached)."""
        loop = asyncio.get_running_loop()
        outer: asyncio.Future[Answer] = loop.create_future()
        self._send(outer, request, loop.time() + timeout, [])
        return outer

    def _send(
        self,
        outer: asyncio.Future[Answer],
        request: pb.PredictRequest,
        deadline: float,
        tried: list[EndpointClient],
        failure: VoteFailure | None = None,
    ) -> None:
        replica = self._pick(tried)
        if replica is None:
            self._inflight.pop(outer, None)
            outer.set_exception(
                failure or VoteFailure(MissingReason.NOT_SERVING, self.health_detail)
            )
            return
        left = max(0.001, deadline - asyncio.get_running_loop().time())
        inner = replica.submit(request, left)
        self._inflight[outer] = (replica, inner)
        inner.add_done_callback(
            functools.partial(self._answered, outer, request, deadline, [*tried, replica], replica)
        )

    def _answered(
        self,
        outer: asyncio.Future[Answer],
        request: pb.PredictRequest,
        deadline: float,
        tried: list[EndpointClient],
        replica: EndpointClient,
        inner: asyncio.Future[Answer],
    ) -> None:
        if outer.done():
            return  # given up (forget) or cancelled
        if inner.cancelled():
            self._inflight.pop(outer, None)
            outer.cancel()
            return
        error = inner.exception()
        if error is None:
            self._inflight.pop(outer, None)
            answer = inner.result()
            replica.breaker.success()
            self._remember(replica, answer)
            outer.set_result(answer)
            return
        if isinstance(error, VoteFailure) and error.reason in (
            MissingReason.UNAVAILABLE,
            MissingReason.DEADLINE_EXCEEDED,
        ):
            replica.breaker.failure(error.message, may_eject=self._may_eject(replica))
            loop = asyncio.get_running_loop()
            if error.reason == MissingReason.UNAVAILABLE and loop.time() < deadline:
                self._send(outer, request, deadline, tried, error)  # the next replica
                return
        else:
            replica.breaker.success()  # it answered, with an error
        self._inflight.pop(outer, None)
        outer.set_exception(error)

    def _remember(self, replica: EndpointClient, answer: Answer) -> None:
        """Which replica made each prediction (Feedback) and gave each model version."""
        address = replica.endpoint.address
        for prediction in answer.response.predictions:
            if prediction.prediction_id:
                self._owners[prediction.prediction_id] = address
        while len(self._owners) > OWNERS_KEPT:
            self._owners.popitem(last=False)
        if answer.response.predictions:
            first = answer.response.predictions[0]
            if len(self._answered_version) > 64:
                self._answered_version.clear()
                self._version_answerer.clear()
            self._answered_version[(first.model_name, first.model_version)] = address
            self._version_answerer[first.model_version] = address

    def forget(self, future: asyncio.Future[Answer]) -> None:
        """Give up on ``future`` (the deadline passed): its replica did not answer in time."""
        entry = self._inflight.pop(future, None)
        if entry is not None:
            replica, inner = entry
            if not inner.done():
                replica.forget(inner)
                replica.breaker.failure(
                    "no answer within the deadline", may_eject=self._may_eject(replica)
                )
        future.cancel()

    async def feedback(self, request: pb.FeedbackRequest, timeout: float) -> pb.FeedbackResponse:
        """Forward one outcome to the replica that made the prediction (another serving one
        when it is gone: without the prediction it answers NOT_FOUND, and the forwarder sends
        the features)."""
        address = self._owners.get(request.prediction_id)
        replica = self.replicas.get(address) if address is not None else None
        if replica is None or not replica.serving:
            replica = self._pick() or next(iter(self.replicas.values()), None)
        if replica is None:
            raise ConnectionError(f"{self.name}: no replica ({self.resolve_detail})")
        return await replica.feedback(request, timeout)

    async def model_info(self, timeout: float = 2.0) -> pb.ModelInfo:
        """GetModelInfo of a serving replica."""
        replica = self._pick() or next(iter(self.replicas.values()), None)
        if replica is None:
            raise ConnectionError(f"{self.name}: no replica ({self.resolve_detail})")
        return await replica.model_info(timeout)

    async def _probe(self, timeout: float) -> str | None:
        """Health Check of every replica: None when one is SERVING, else the first reason."""
        replicas = list(self.replicas.values())
        if not replicas:
            return self.resolve_detail
        results = await asyncio.gather(*(r._probe(timeout) for r in replicas))
        if any(why is None for why in results):
            return None
        return results[0]

    async def close(self, grace: float = 1.0) -> None:
        """Stop resolving; close every replica (answers in flight get ``grace`` seconds)."""
        if self._maintain is not None:
            self._maintain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintain
        retiring = list(self._retiring.values())
        for task in list(self._retiring):
            task.cancel()
        await self.breaker.close()
        await asyncio.gather(*(r.close(grace) for r in [*self.replicas.values(), *retiring]))
