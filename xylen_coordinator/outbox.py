"""The outbox: trade outcomes on disk before they are acknowledged, forwarded to the model
servers later (the ``feedback_queue`` section of config.yaml says where and how).

:class:`Outbox` is one SQLite file in WAL mode with ``synchronous=FULL`` (every commit is
fsynced; opened by :func:`xylen_server.durable.sqlite_connect`, as the servers' feedback
stores are) that holds

* ``predictions`` -- what each server answered for each ensemble prediction (its own prediction
  id and probability), written behind in small batches so Predict never waits on the disk;
* ``outcomes`` -- one row per ensemble prediction id (the primary key makes a second Feedback
  for the same id a no-op: idempotent);
* ``deliveries`` -- one row per (prediction, server) to forward, with its due time, attempts
  and state (``pending``, ``delivered``, ``failed``: refused for good, ``abandoned``: its server
  left the configuration for longer than the retention);
* ``targets`` -- when each server was last seen among the enabled endpoints (or first found
  absent with deliveries pending), so that how long a server has been gone survives restarts.

**Retention.** Nothing stays for ever: :meth:`Outbox.prune_predictions` deletes predictions
made before a cutoff and :meth:`Outbox.prune_outcomes` outcomes received before one whose
deliveries are all finished (``delivered``, ``failed`` or ``abandoned``), with those deliveries
and the prediction; each is one small transaction (:data:`SWEEP_BATCH` rows examined) that
:class:`~xylen_coordinator.feedback.Ledger` repeats every few minutes
(``feedback_queue.retention_seconds``). An outcome with a delivery still pending is never
deleted, however old (nothing acknowledged is lost), and neither is the prediction it settles
(its feature row may still be needed). A delivery stays pending while its server is configured,
however long the server is down; one whose server has been absent from the configuration for
longer than the retention is marked ``abandoned`` (:meth:`Outbox.absent_targets`,
:meth:`Outbox.abandon`) and then goes with its outcome like any finished delivery. Indexes on
``predictions.created`` and ``outcomes.received`` keep each batch a range scan (an outbox from
before them gets them, in one pass over its rows, when it is first opened).

All database work runs on one dedicated thread, never on the event loop. :class:`Forwarder`
delivers due rows to each server's ``Feedback`` and retries failures with exponential backoff;
because state lives in the file, a restarted coordinator carries on where the last one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from xylen.v1 import model_service_pb2 as pb
from xylen_coordinator.config import ConfigError, FeedbackQueueSettings
from xylen_coordinator.ensemble import Label
from xylen_coordinator.metrics import Metrics
from xylen_coordinator.replicas import ReplicaSet
from xylen_server.durable import sqlite_connect
from xylen_server.trouble import Trouble

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Status codes after which a delivery is never retried.
PERMANENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    prediction_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    signal TEXT NOT NULL,
    votes TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outcomes (
    prediction_id TEXT PRIMARY KEY,
    received REAL NOT NULL,
    outcome BLOB NOT NULL,
    signal TEXT NOT NULL,
    votes TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    prediction_id TEXT NOT NULL,
    server_name TEXT NOT NULL,
    model_prediction_id TEXT NOT NULL,
    due REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (prediction_id, server_name)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, due);
CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created);
CREATE INDEX IF NOT EXISTS outcomes_received ON outcomes (received);
CREATE TABLE IF NOT EXISTS targets (
    server_name TEXT PRIMARY KEY,
    seen REAL NOT NULL
);
"""

#: Rows the retention sweep examines in one transaction (:meth:`Outbox.prune_predictions`,
#: :meth:`Outbox.prune_outcomes`): the write-behind of predictions waits for at most one batch.
SWEEP_BATCH = 2000

#: Where a sweep of a table starts: before every (time, rowid) key.
SWEEP_START: tuple[float, int] = (float("-inf"), -1)


@dataclass(frozen=True)
class PredictionRecord:
    """What the coordinator needs to settle an ensemble prediction later."""

    signal: str
    """The ensemble's signal (BUY, SELL, HOLD): tells which way a trade's return points."""
    votes: dict[str, tuple[str, float]]
    """What each server voted: server name -> (its own prediction id, its probability)."""
    created: float = 0.0
    """When the prediction was made, epoch seconds (0: not known)."""
    features: tuple[float, ...] = ()
    """The feature row the servers in ``feature_servers`` predicted on (empty: not known)."""
    feature_servers: tuple[str, ...] = ()
    """Servers whose features are ``features``: sent to them with an outcome when they no
    longer hold the prediction (a kill -9 took their unflushed prediction log)."""
    label: Label | None = None
    """What the ensemble's probability meant when it decided (horizon, fee, label threshold):
    its horizon is the outcome's (the trade followed this decision). None: not known (an
    outbox from before labels were kept, or no server reported its model info)."""
    labels: dict[str, Label] = field(default_factory=dict)
    """Each voter's own label definition when it voted (server name -> (horizon, fee, label
    threshold)), for the voters whose model info the coordinator knew."""


def with_decision_side(outcome: pb.TradeOutcome, signal: str) -> pb.TradeOutcome | None:
    """``outcome`` as it must travel: unchanged when it carries a side or the underlying's
    return; else with the side of the trade that followed the ensemble's ``signal`` (BUY long,
    SELL short); None after a HOLD (no trade followed it, so nothing says which way the price
    went)."""
    if outcome.side or outcome.HasField("underlying_log_return"):
        return outcome
    if signal not in ("BUY", "SELL"):
        return None
    sided = pb.TradeOutcome()
    sided.CopyFrom(outcome)
    sided.side = pb.TradeSide.TRADE_SIDE_LONG if signal == "BUY" else pb.TradeSide.TRADE_SIDE_SHORT
    return sided


@dataclass(frozen=True)
class Delivery:
    """One outcome to forward to one server."""

    prediction_id: str
    server_name: str
    model_prediction_id: str
    outcome: bytes
    attempts: int
    signal: str = ""
    """The ensemble's signal the outcome settles (BUY, SELL, HOLD)."""
    features: tuple[float, ...] = ()
    """The prediction's feature row for this server, if the coordinator knows it."""


@dataclass(frozen=True)
class StoredOutcome:
    """A recorded outcome and the prediction it settles (for rebuilding adaptive weights)."""

    record: PredictionRecord
    outcome: pb.TradeOutcome


def _own(path: Path) -> int:
    """An open descriptor of ``path``'s lock file (``<path>.lock``), flocked: one coordinator
    per outbox. Two would each forward the same deliveries and prune under each other (and
    race to add a column to an old file); the second is refused, naming the file."""
    lock = path.with_name(f"{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"feedback_queue.path {path} is in use by another coordinator (it holds {lock}); "
            "give each coordinator a feedback_queue.path of its own"
        ) from None
    return fd


class Outbox:
    """The SQLite file of outcomes to forward (and the prediction log), used from one thread.
    One coordinator at a time: a second one opening the same file gets a ConfigError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _own(path)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="feedback-db")
        self._db: sqlite3.Connection | None = None
        try:
            self._executor.submit(self._open).result()
        except BaseException:
            self._executor.shutdown()
            os.close(self._lock_fd)
            raise

    def _open(self) -> None:
        db = sqlite_connect(self.path)  # WAL, synchronous=FULL: as the server's feedback store
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(predictions)")}
        if "features" not in columns:  # an outbox written before features were kept
            with db:
                db.execute("ALTER TABLE predictions ADD COLUMN features TEXT NOT NULL DEFAULT ''")
        for table in ("predictions", "outcomes"):  # an outbox written before labels were kept
            if "labels" not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                with db:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN labels TEXT NOT NULL DEFAULT ''")
        self._db = db

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None
        return self._db

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the database thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- on the database thread -----------------------------------------------------------

    def write_predictions(self, rows: Iterable[tuple[str, float, PredictionRecord]]) -> None:
        encoded = [
            (
                pid,
                created,
                record.signal,
                json.dumps(record.votes),
                _encode_features(record),
                _encode_labels(record),
            )
            for pid, created, record in rows
        ]
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR IGNORE INTO predictions (prediction_id, created, signal, votes, "
                "features, labels) VALUES (?, ?, ?, ?, ?, ?)",
                encoded,
            )

    def find_prediction(self, prediction_id: str) -> PredictionRecord | None:
        """The prediction, or what its recorded outcome kept of it (the retention sweep deleted
        the prediction just as its outcome arrived: a second Feedback is still a duplicate);
        None when neither is known."""
        row = self.db.execute(
            "SELECT signal, votes, created, features, labels FROM predictions "
            "WHERE prediction_id = ?",
            (prediction_id,),
        ).fetchone()
        if row is None:
            kept = self.db.execute(
                "SELECT signal, votes, labels FROM outcomes WHERE prediction_id = ?",
                (prediction_id,),
            ).fetchone()
            if kept is None:
                return None
            label, labels = _decode_labels(kept[2])
            return PredictionRecord(kept[0], _decode_votes(kept[1]), label=label, labels=labels)
        features, servers = _decode_features(row[3])
        label, labels = _decode_labels(row[4])
        return PredictionRecord(
            row[0], _decode_votes(row[1]), float(row[2]), features, tuple(servers), label, labels
        )

    def enqueue(
        self,
        prediction_id: str,
        outcome: bytes,
        record: PredictionRecord,
        targets: Iterable[str],
        received: float,
        due: float,
    ) -> bool:
        """Record the outcome and its deliveries in one fsynced transaction; False when the
        prediction already had an outcome (nothing is written)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO outcomes (prediction_id, received, outcome, signal, votes, "
                "labels) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    prediction_id,
                    received,
                    outcome,
                    record.signal,
                    json.dumps(record.votes),
                    _encode_labels(record),
                ),
            )
            if cursor.rowcount == 0:
                return False
            self.db.executemany(
                "INSERT OR IGNORE INTO deliveries (prediction_id, server_name, "
                "model_prediction_id, due) VALUES (?, ?, ?, ?)",
                [(prediction_id, name, record.votes[name][0], due) for name in targets],
            )
        return True

    def due(self, now: float, limit: int = 256) -> list[Delivery]:
        rows = self.db.execute(
            "SELECT d.prediction_id, d.server_name, d.model_prediction_id, o.outcome, d.attempts, "
            "o.signal, p.features FROM deliveries d JOIN outcomes o USING (prediction_id) "
            "LEFT JOIN predictions p ON p.prediction_id = d.prediction_id "
            "WHERE d.state = 'pending' AND d.due <= ? ORDER BY d.due LIMIT ?",
            (now, limit),
        ).fetchall()
        deliveries = []
        for pid, server, model_pid, outcome, attempts, signal, encoded in rows:
            features, servers = _decode_features(encoded or "")
            known = features if server in servers else ()
            deliveries.append(Delivery(pid, server, model_pid, outcome, attempts, signal, known))
        return deliveries

    def next_due(self) -> float | None:
        row = self.db.execute("SELECT MIN(due) FROM deliveries WHERE state = 'pending'").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def settle(self, results: Iterable[tuple[Delivery, str, float | None, str]]) -> None:
        """Apply delivery results: (delivery, new state, next due or None, error text). A
        delivery abandoned by the sweep since it was read stays abandoned (a failed attempt
        would make it pending again) unless it was delivered."""
        with self.db:
            self.db.execute("BEGIN")
            for delivery, state, due, error in results:
                self.db.execute(
                    "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?, "
                    "due = COALESCE(?, due) WHERE prediction_id = ? AND server_name = ? "
                    "AND (state = 'pending' OR ? = 'delivered')",
                    (state, error, due, delivery.prediction_id, delivery.server_name, state),
                )

    def absent_targets(self, configured: Collection[str], now: float) -> dict[str, float]:
        """Note that the ``configured`` servers (the enabled endpoints) are configured at ``now``
        (epoch seconds), and return every other server with a delivery pending, with when it was
        last seen configured: for a server this outbox never saw configured (removed before the
        outbox knew, or an outbox from before it kept track), the first time it was found
        absent, which is ``now`` at the first call that finds it."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT INTO targets (server_name, seen) VALUES (?, ?) ON CONFLICT (server_name) "
                "DO UPDATE SET seen = MAX(seen, excluded.seen)",
                [(name, now) for name in configured],
            )
            waiting = [
                row[0]
                for row in self.db.execute(
                    "SELECT DISTINCT server_name FROM deliveries WHERE state = 'pending'"
                )
                if row[0] not in configured
            ]
            self.db.executemany(
                "INSERT OR IGNORE INTO targets (server_name, seen) VALUES (?, ?)",
                [(name, now) for name in waiting],
            )
            absent = {}
            for name in waiting:
                row = self.db.execute(
                    "SELECT seen FROM targets WHERE server_name = ?", (name,)
                ).fetchone()
                absent[name] = float(row[0])
        return absent

    def abandon(self, server_name: str, error: str, limit: int = SWEEP_BATCH) -> int:
        """Mark at most ``limit`` pending deliveries to ``server_name`` ``abandoned`` (with
        ``error`` as their last error), in one transaction; returns how many."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cursor = self.db.execute(
                "UPDATE deliveries SET state = 'abandoned', last_error = ? WHERE rowid IN ("
                "SELECT rowid FROM deliveries WHERE state = 'pending' AND server_name = ? "
                "LIMIT ?)",
                (error, server_name, limit),
            )
        return max(cursor.rowcount, 0)

    def pending_count(self) -> int:
        row = self.db.execute(
            "SELECT COUNT(DISTINCT prediction_id) FROM deliveries WHERE state = 'pending'"
        ).fetchone()
        return int(row[0])

    def delivery_states(self, prediction_id: str) -> dict[str, tuple[str, int, str]]:
        """server name -> (state, attempts, last error) for one prediction."""
        rows = self.db.execute(
            "SELECT server_name, state, attempts, last_error FROM deliveries "
            "WHERE prediction_id = ?",
            (prediction_id,),
        ).fetchall()
        return {name: (state, attempts, error) for name, state, attempts, error in rows}

    def outcomes(self) -> list[StoredOutcome]:
        """Every recorded outcome, oldest first."""
        rows = self.db.execute(
            "SELECT signal, votes, outcome, labels FROM outcomes ORDER BY received"
        ).fetchall()
        stored = []
        for signal, votes, outcome, encoded in rows:
            label, labels = _decode_labels(encoded)
            record = PredictionRecord(signal, _decode_votes(votes), label=label, labels=labels)
            stored.append(StoredOutcome(record, pb.TradeOutcome.FromString(outcome)))
        return stored

    def prune_predictions(
        self, before: float, after: tuple[float, int], limit: int = SWEEP_BATCH
    ) -> tuple[int, tuple[float, int] | None]:
        """Delete, in one transaction, the predictions made before ``before`` (``created``,
        epoch seconds) among the next ``limit`` in (created, rowid) order after ``after``, except
        those that have an outcome (they go with it, :meth:`prune_outcomes`). Returns the rows
        deleted and where the next batch starts (None: no more rows before ``before``)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            rows = self.db.execute(
                "SELECT p.rowid, p.created, o.prediction_id IS NULL FROM predictions p "
                "LEFT JOIN outcomes o ON o.prediction_id = p.prediction_id "
                "WHERE p.created < ? AND (p.created, p.rowid) > (?, ?) "
                "ORDER BY p.created, p.rowid LIMIT ?",
                (before, *after, limit),
            ).fetchall()
            free = [(rowid,) for rowid, _, alone in rows if alone]
            self.db.executemany("DELETE FROM predictions WHERE rowid = ?", free)
        following = (float(rows[-1][1]), int(rows[-1][0])) if len(rows) == limit else None
        return len(free), following

    def prune_outcomes(
        self, before: float, after: tuple[float, int], limit: int = SWEEP_BATCH
    ) -> tuple[dict[str, int], tuple[float, int] | None]:
        """Delete, in one transaction, the outcomes received before ``before`` (epoch seconds)
        among the next ``limit`` in (received, rowid) order after ``after`` whose deliveries
        are all finished (``delivered``, ``failed`` or ``abandoned``; none pending), with those
        deliveries and the prediction each settles. Returns the rows deleted by table and where
        the next batch starts (None: no more rows before ``before``)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            # ``+d.state``: look the deliveries up by prediction id (the primary key), not by
            # the (state, due) index, which would walk every pending delivery per outcome.
            rows = self.db.execute(
                "SELECT o.rowid, o.received, o.prediction_id, EXISTS (SELECT 1 FROM deliveries d "
                "WHERE d.prediction_id = o.prediction_id AND +d.state = 'pending') "
                "FROM outcomes o WHERE o.received < ? AND (o.received, o.rowid) > (?, ?) "
                "ORDER BY o.received, o.rowid LIMIT ?",
                (before, *after, limit),
            ).fetchall()
            done = [(pid,) for _, _, pid, pending in rows if not pending]
            counts = {}
            for table in ("deliveries", "outcomes", "predictions"):
                cursor = self.db.executemany(
                    f"DELETE FROM {table} WHERE prediction_id = ?",
                    done,
                )
                counts[table] = max(cursor.rowcount, 0)
        following = (float(rows[-1][1]), int(rows[-1][0])) if len(rows) == limit else None
        return counts, following

    def row_counts(self) -> dict[str, int]:
        """Rows in each table."""
        return {
            table: int(self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            for table in ("predictions", "outcomes", "deliveries")
        }

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
            os.close(self._lock_fd)  # releases the flock: another coordinator may open it now

    async def close(self) -> None:
        await self.run(self._close)
        self._executor.shutdown(wait=True)


def _encode_features(record: PredictionRecord) -> str:
    if not record.features or not record.feature_servers:
        return ""
    return json.dumps({"values": record.features, "servers": record.feature_servers})


def _decode_features(text: str) -> tuple[tuple[float, ...], list[str]]:
    if not text:
        return (), []
    raw = json.loads(text)
    return tuple(float(v) for v in raw["values"]), [str(s) for s in raw["servers"]]


def _encode_labels(record: PredictionRecord) -> str:
    if record.label is None and not record.labels:
        return ""
    return json.dumps({"ensemble": record.label, "voters": record.labels})


def _as_label(raw: list[float]) -> Label:
    horizon, fee, threshold = raw
    return (int(horizon), float(fee), float(threshold))


def _decode_labels(text: str) -> tuple[Label | None, dict[str, Label]]:
    if not text:
        return None, {}
    raw = json.loads(text)
    label = None if raw["ensemble"] is None else _as_label(raw["ensemble"])
    return label, {str(name): _as_label(v) for name, v in raw["voters"].items()}


def _decode_votes(text: str) -> dict[str, tuple[str, float]]:
    return {name: (str(pid), float(p)) for name, (pid, p) in json.loads(text).items()}


class Forwarder:
    """Delivers due outcomes to the model servers, retrying with backoff until they succeed.

    ``clients`` returns the current endpoint clients by name (it changes on reload); a
    delivery for a server no longer configured waits, pending, until it is configured again
    (or the retention sweep abandons it, :meth:`~xylen_coordinator.feedback.Ledger.sweep`).
    ``settings`` may be replaced while it runs (a reload): the next delivery uses the new
    backoff and call timeout.

    A delivery refused for good (:data:`PERMANENT_CODES`) is marked ``failed`` with the
    server's answer as its error; such refusals are counted by server and code and told once
    when they begin (per server and code, with the first message) and once when a delivery to
    that server works again, each outcome's own line at DEBUG only.
    """

    def __init__(
        self,
        outbox: Outbox,
        settings: FeedbackQueueSettings,
        clients: Callable[[], Mapping[str, ReplicaSet]],
        metrics: Metrics | None = None,
    ) -> None:
        self.outbox = outbox
        self.settings = settings
        self._clients = clients
        self._trouble = Trouble(
            "feedback_forwarding",
            "the outbox",
            logger,
            None if metrics is None else metrics.outbox_failed,
        )
        self._metrics = metrics
        self._targets: dict[str, Trouble] = {}
        """Each server's failed deliveries: one line when they begin, one when one works."""
        self._refusals: dict[tuple[str, str], Trouble] = {}
        """Each server's refusals for good, by status code name, told the same way."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.retries = 0
        """Deliveries that failed and were rescheduled since the start (the metrics)."""

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="feedback-forwarder")

    def wake(self) -> None:
        """Look at the outbox now (a new outcome arrived)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._deliver_due()
                next_due = await self.outbox.run(self.outbox.next_due)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                wait = self.settings.retry_initial_seconds
                self._trouble.failed(exc, f"outcomes stay queued, retried every {wait:.1f}s")
                next_due = time.time() + wait
            else:
                self._trouble.worked()
            wait = 5.0 if next_due is None else min(5.0, max(0.0, next_due - time.time()))
            self._wake.clear()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)

    async def _deliver_due(self) -> None:
        while True:
            batch = await self.outbox.run(self.outbox.due, time.time())
            if not batch:
                return
            results = await asyncio.gather(*(self._deliver(d) for d in batch))
            await self.outbox.run(self.outbox.settle, results)
            if all(state == "pending" for _, state, _, _ in results):
                return  # everything due failed: wait for the backoff

    async def _deliver(self, delivery: Delivery) -> tuple[Delivery, str, float | None, str]:
        client = self._clients().get(delivery.server_name)
        if client is None:
            return self._retry(
                delivery,
                "endpoint not configured",
                "its outcomes wait for it to be configured again, and are abandoned once it "
                "has been absent for longer than feedback_queue.retention_seconds",
            )
        outcome = pb.TradeOutcome.FromString(delivery.outcome)
        # An outcome queued by a coordinator from before TradeOutcome.side: its trade followed
        # the decision, and the server needs the side to label it.
        outcome = with_decision_side(outcome, delivery.signal) or outcome
        request = pb.FeedbackRequest(prediction_id=delivery.model_prediction_id, outcome=outcome)
        try:
            try:
                await client.feedback(request, self.settings.call_timeout_seconds)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND or not delivery.features:
                    raise
                # The server lost the prediction (a kill -9 before its log was flushed): the
                # features it was made on let it take the outcome all the same.
                logger.info(
                    "feedback %s: %s no longer holds the prediction; sending its features",
                    delivery.prediction_id,
                    delivery.server_name,
                )
                request.features.values.extend(delivery.features)
                await client.feedback(request, self.settings.call_timeout_seconds)
        except grpc.aio.AioRpcError as error:
            text = f"{error.code().name}: {error.details()}"
            if error.code() == grpc.StatusCode.ALREADY_EXISTS:
                self._worked(delivery.server_name)
                return delivery, "delivered", None, ""
            if error.code() in PERMANENT_CODES:
                return self._refused(delivery, error.code(), text)
            return self._retry(delivery, text)
        except Exception as error:  # a closed channel during reload, for example
            return self._retry(delivery, f"{type(error).__name__}: {error}")
        logger.debug("feedback %s delivered to %s", delivery.prediction_id, delivery.server_name)
        self._worked(delivery.server_name)
        return delivery, "delivered", None, ""

    def _worked(self, server_name: str) -> None:
        """A delivery to ``server_name`` worked: the end of its failures and refusals."""
        self._target(server_name).worked()
        for (name, _), trouble in list(self._refusals.items()):
            if name == server_name:
                trouble.worked()

    def _refused(
        self, delivery: Delivery, code: grpc.StatusCode, text: str
    ) -> tuple[Delivery, str, float | None, str]:
        """A refusal for good: ``failed``, counted, told once per server and code."""
        logger.debug(
            "feedback %s to %s refused for good: %s",
            delivery.prediction_id,
            delivery.server_name,
            text,
        )
        key = (delivery.server_name, code.name)
        trouble = self._refusals.get(key)
        if trouble is None:
            metrics = self._metrics
            trouble = Trouble(
                "feedback_refused",
                f"delivery to {delivery.server_name}",
                logger,
                None if metrics is None else lambda _: metrics.refused(*key),
                subject="feedback refused for good",
            )
            self._refusals[key] = trouble
        trouble.failed(
            text,
            f"each outcome it refuses with {code.name} is marked failed and not retried (its "
            "answer kept as the delivery's last error; each one logged at DEBUG)",
        )
        return delivery, "failed", None, text

    def _target(self, server_name: str) -> Trouble:
        trouble = self._targets.get(server_name)
        if trouble is None:
            trouble = Trouble(
                "feedback_delivery",
                f"delivery to {server_name}",
                logger,
                subject="feedback",
                level=logging.INFO,
            )
            self._targets[server_name] = trouble
        return trouble

    def _retry(
        self, delivery: Delivery, error: str, meanwhile: str = ""
    ) -> tuple[Delivery, str, float | None, str]:
        self.retries += 1
        delay = min(
            self.settings.retry_max_seconds,
            self.settings.retry_initial_seconds * 2 ** min(delivery.attempts, 30),
        )
        # One line when deliveries to a server begin to fail and one when one works again,
        # not one per delivery per pass for as long as the server is down.
        logger.debug(
            "feedback %s to %s failed (attempt %d, retry in %.1fs): %s",
            delivery.prediction_id,
            delivery.server_name,
            delivery.attempts + 1,
            delay,
            error,
        )
        self._target(delivery.server_name).failed(
            error,
            meanwhile
            or f"its outcomes stay queued, each retried with backoff up to "
            f"{self.settings.retry_max_seconds:g}s",
        )
        return delivery, "pending", time.time() + delay, error

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
