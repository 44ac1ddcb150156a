"""The `database` broker: the embedded queue, kept in the `queue_messages` table.

Each published event becomes one row per bound consumer queue. A consumer leases rows
(`leased_until`, a `lease_token` of its own), keeps the lease alive while its handler
runs, and deletes the row after the handler's commit (ack). A consumer that dies simply
lets the lease run out and another takes the row: at-least-once across restarts, with
the consumers' inbox rows making a second application a no-op.

Acks: the rows of the messages handled within a quarter of a second are deleted together,
in one statement (`_Acks`). The lease keeps a handled row from every claim meanwhile, and
a process that dies before the delete leaves a row that the inbox makes a no-op, as
above; so the wait costs nothing but the row's stay, and saves a write transaction per
message and queue at low load, behind SQLite's one write lock.

Hand-over: a consumer in the publisher's own process (`aigen up` runs them all in one)
gets the messages it has room for without a claim. The publishing transaction writes
their rows already leased (a token of its own, `deliveries` 1, as a claim leaves them),
and once it has committed they are handed to the consumer in memory (`_Hand`): a write
transaction less per message, behind SQLite's one write lock, and no wait for it. A
process that dies before handling them leaves rows whose lease runs out, and a later
claim takes them, as for any message in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import structlog
from sqlalchemy import bindparam, delete, event, func, insert, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from aigen.aio import IDLE_POLL_MAX_SECONDS, IdlePoll, sleep_or_stop, wait_any
from aigen.clock import utcnow
from aigen.db import driver
from aigen.db.base import table, unleased
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import QueueMessage

from .broker import DeadLetterHook, Handler, Retry
from .messages import Envelope
from .topology import dead_letter_queue, queues_for

log = structlog.get_logger(__name__)

# A handled message's row is deleted at most this long after its handler returned, with
# the others handled meanwhile (`_Acks`); far shorter than a lease.
ACK_GAP_SECONDS = 0.25
# Rows per DELETE: a statement's parameters stay within SQLite's limit after an outage.
ACK_CHUNK = 500


@dataclass(frozen=True, slots=True)
class _Lease:
    id: int
    token: str
    deliveries: int
    body: str


class _Hand:
    """The consumer of a queue in this process that takes hand-overs: its slots, and the
    leases on their way to it (`reserved`: written in transactions not yet ended)."""

    def __init__(self, prefetch: int, in_flight: set[asyncio.Task[None]]) -> None:
        self.prefetch = prefetch
        self.in_flight = in_flight
        self.reserved = 0
        self.handed: list[_Lease] = []
        self.changed = asyncio.Event()  # a lease handed over, or a reservation ended
        # Rows wait in the table for a claim: until one drains it, new messages queue
        # behind them rather than overtake them (under load, the consumer's freed slots
        # would otherwise always go to the newest, and the oldest wait for a lull).
        self.backlog = False

    def room(self) -> int:
        return self.prefetch - len(self.in_flight) - len(self.handed) - self.reserved

    def take(self) -> list[_Lease]:
        handed, self.handed = self.handed, []
        return handed


class DatabaseBroker:
    """A broker in the application database; needs no server (DESIGN §5)."""

    def __init__(
        self,
        sessionmaker: Sessionmaker,
        *,
        lease_seconds: float = 30.0,
        poll_interval: float = 0.05,
        delivery_limit: int = 5,
        retry_base: float = 1.0,
        retry_max: float = 300.0,
        idle_poll_max: float = IDLE_POLL_MAX_SECONDS,
        ack_gap: float = ACK_GAP_SECONDS,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._lease = lease_seconds
        self._poll = poll_interval
        self._idle_poll_max = idle_poll_max
        self._limit = delivery_limit
        self._retry_base = retry_base
        self._retry_max = retry_max
        # Consumers in this process wake at once on a publish; others poll.
        self._wakeups: dict[str, asyncio.Event] = {}
        # The consumer of each queue in this process that takes hand-overs (one a queue).
        self._hands: dict[str, _Hand] = {}
        self._acks = _Acks(sessionmaker, ack_gap)

    async def start(self) -> None:
        return None

    async def ping(self) -> None:
        async with self._sessionmaker() as session:
            await session.execute(text("SELECT 1"))

    async def aclose(self) -> None:
        return None

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        async with unit_of_work(self._sessionmaker) as session:
            await self.publish_in(session, envelopes)

    async def publish_in(self, session: AsyncSession, envelopes: Sequence[Envelope]) -> None:
        """Fan out inside the caller's transaction: the one that adds the events
        (`outbox.write_through`), or the relay's, which marks their rows sent in it.

        The rows for a consumer in this process with room to spare are written leased to
        it, and handed over once the transaction commits (see the module docstring)."""
        now = utcnow()
        token = secrets.token_hex(8)
        lease_end = now + timedelta(seconds=self._lease)
        rows: list[dict[str, object]] = []
        handing: list[tuple[_Hand, dict[str, object]]] = []
        for envelope in envelopes:
            body = envelope.to_json()
            for queue in queues_for(envelope.routing_key):
                row: dict[str, object] = {
                    "queue": queue,
                    "event_id": envelope.id,
                    "routing_key": envelope.routing_key,
                    "body": body,
                    "available_at": now,
                    "created_at": now,
                    "deliveries": 0,
                    "leased_until": None,
                    "lease_token": None,
                }
                hand = self._hands.get(queue)
                # (A stopped consumer is no longer in `_hands`: nothing is handed to it.)
                if hand is not None and not hand.backlog and hand.room() > 0:
                    # Taken before any await: no other publish can give away the slot.
                    hand.reserved += 1
                    row |= {"deliveries": 1, "leased_until": lease_end, "lease_token": token}
                    handing.append((hand, row))
                elif hand is not None:
                    hand.backlog = True
                rows.append(row)
        if not rows:
            return
        ids: dict[tuple[object, object], int] = {}
        try:
            if handing:
                written = await driver.execute(session, _INSERT_RETURNING, rows)
                ids = {(queue, event_id): row_id for row_id, queue, event_id in written.all()}
            else:
                await driver.execute(session, _INSERT, rows)
        except BaseException:
            # Nothing was written: the reservations are this call's to give back.
            _release(hand for hand, _ in handing)
            raise
        # From here the transaction's end hands them over, or gives them back.
        session.info.setdefault(_HAND_AFTER_COMMIT, []).extend(
            (hand, _Lease(ids[(row["queue"], row["event_id"])], token, 1, str(row["body"])))
            for hand, row in handing
        )
        # Woken once the rows are committed: a consumer woken before would find nothing
        # (PostgreSQL), and then wait for its next poll. Rows handed over need no claim.
        unhanded = {str(row["queue"]) for row in rows if row["lease_token"] is None}
        waking: list[asyncio.Event] = session.info.setdefault(_WAKE_AFTER_COMMIT, [])
        waking.extend(self._wakeup(queue) for queue in unhanded)

    def _wakeup(self, queue: str) -> asyncio.Event:
        return self._wakeups.setdefault(queue, asyncio.Event())

    async def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        stop: asyncio.Event,
        prefetch: int,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        in_flight: set[asyncio.Task[None]] = set()
        wakeup = self._wakeup(queue)
        # Hand-overs go to the first consumer of the queue in this process; another
        # one (tests run several) claims only.
        hand = _Hand(prefetch, in_flight) if queue not in self._hands else None
        if hand is not None:
            self._hands[queue] = hand

        def start(leases: Sequence[_Lease]) -> None:
            for lease in leases:
                task = asyncio.create_task(self._handle(queue, lease, handler, on_dead_letter))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)

        # A queue found empty is asked less and less often; a publish in this process
        # still wakes it at once (`wakeup`), and so does a retry when it falls due.
        idle = IdlePoll(self._poll, self._idle_poll_max)
        claim_at = time.monotonic()  # the next claim's time, when nothing wakes it sooner
        try:
            while not stop.is_set():
                if hand is not None:
                    hand.changed.clear()
                    start(hand.take())
                # Counting the hand-overs on their way as taken.
                free = hand.room() if hand is not None else prefetch - len(in_flight)
                if free <= 0:
                    # Full: wait for a slot, or for a hand-over (or a reservation given
                    # back), rather than polling.
                    await _first(in_flight, hand.changed if hand is not None else None)
                    continue
                if wakeup.is_set() or time.monotonic() >= claim_at:
                    # Cleared before the claim, not after an empty one: a publish during
                    # the claim then ends the wait below at once, instead of being lost
                    # until the next poll.
                    wakeup.clear()
                    try:
                        leases = await self._claim(queue, free)
                    except Exception:
                        log.exception("queue.claim_failed", queue=queue)
                        await sleep_or_stop(stop, 1.0)
                        continue
                    start(leases)
                    wait = idle.after(found=bool(leases))
                    if hand is not None:
                        hand.backlog = len(leases) == free
                    if len(leases) == free:
                        claim_at = time.monotonic()  # a full claim: more may be waiting
                        continue
                    claim_at = time.monotonic() + wait
                # The queue held no more: claiming again at once would find nothing but
                # cost a write transaction. A publish in this process (or a hand-over),
                # or the next poll, ends the wait instead.
                await wait_any(
                    max(0.0, claim_at - time.monotonic()),
                    stop,
                    wakeup,
                    *([hand.changed] if hand is not None else []),
                )
        finally:
            if hand is not None:
                del self._hands[queue]
        if hand is not None:
            # What was handed over, or is on its way from a transaction ending now, is in
            # hand: handled before the consumer returns, as claimed messages are.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HAND_OVER_GRACE_SECONDS):
                    while hand.reserved:
                        hand.changed.clear()
                        await hand.changed.wait()
            start(hand.take())
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
        # A stopped consumer leaves no handled message behind for a claim after the lease.
        await self._acks.drain()

    async def _claim(self, queue: str, limit: int) -> list[_Lease]:
        now = utcnow()
        token = secrets.token_hex(8)
        params = {
            "queue_name": queue,
            "now": now,
            "limit": limit,
            "lease_end": now + timedelta(seconds=self._lease),
            "token": token,
        }
        async with unit_of_work(self._sessionmaker) as session:
            result = await driver.execute(session, _CLAIM, params)
            rows = sorted(result.all())
        return [_Lease(row_id, token, deliveries, body) for row_id, deliveries, body in rows]

    async def _handle(
        self,
        queue: str,
        lease: _Lease,
        handler: Handler,
        on_dead_letter: DeadLetterHook | None,
    ) -> None:
        envelope = Envelope.from_json(lease.body)
        heartbeat = asyncio.create_task(self._keep_leased(lease))
        try:
            await handler(envelope)
        except Retry as retry:
            # A deliberate retry is not a failure: it does not count toward the limit.
            await self._retry(
                queue, lease, envelope, retry.delay, str(retry), on_dead_letter, counts=False
            )
        except Exception as exc:
            log.warning(
                "queue.handler_failed",
                queue=queue,
                event_id=envelope.id,
                job_id=envelope.data.get("job_id"),
                deliveries=lease.deliveries,
                error=repr(exc),
            )
            delay = min(self._retry_max, self._retry_base * 2 ** (lease.deliveries - 1))
            delay *= random.uniform(0.8, 1.2)
            await self._retry(queue, lease, envelope, delay, repr(exc), on_dead_letter)
        else:
            self._acks.add(lease)
        finally:
            heartbeat.cancel()

    async def _keep_leased(self, lease: _Lease) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                async with unit_of_work(self._sessionmaker) as session:
                    await session.execute(
                        update(QueueMessage)
                        .where(QueueMessage.id == lease.id, QueueMessage.lease_token == lease.token)
                        .values(leased_until=utcnow() + timedelta(seconds=self._lease))
                    )
            except Exception:
                log.exception("queue.heartbeat_failed", message_id=lease.id)

    async def _retry(
        self,
        queue: str,
        lease: _Lease,
        envelope: Envelope,
        delay: float,
        error: str,
        on_dead_letter: DeadLetterHook | None,
        *,
        counts: bool = True,
    ) -> None:
        dead = counts and lease.deliveries >= self._limit
        now = utcnow()
        values: dict[str, object] = {"leased_until": None, "lease_token": None, "last_error": error}
        if not counts:
            values["deliveries"] = QueueMessage.deliveries - 1
        if dead:
            values |= {"queue": dead_letter_queue(queue), "dead_at": now}
        else:
            values["available_at"] = now + timedelta(seconds=delay)
        async with unit_of_work(self._sessionmaker) as session:
            await session.execute(
                update(QueueMessage)
                .where(QueueMessage.id == lease.id, QueueMessage.lease_token == lease.token)
                .values(**values)
            )
        if not dead:
            # Consumers of this queue in this process look again when it is due, however
            # idle they have been.
            asyncio.get_running_loop().call_later(delay, self._wakeup(queue).set)
            return
        log.error("queue.dead_lettered", queue=queue, event_id=envelope.id, error=error)
        if on_dead_letter is not None:
            try:
                await on_dead_letter(envelope, error)
            except Exception:
                # The message stays in the dead-letter queue for an operator to replay.
                log.exception("queue.dead_letter_hook_failed", event_id=envelope.id)


# The consumers' wake-ups that a transaction sets when it commits (`publish_in`), and
# the leases it hands over then: (consumer, lease).
_WAKE_AFTER_COMMIT = "aigen.queue.wake_after_commit"
_HAND_AFTER_COMMIT = "aigen.queue.hand_after_commit"
# How long a stopping consumer waits for the hand-overs of transactions still running.
HAND_OVER_GRACE_SECONDS = 5.0


@event.listens_for(Session, "after_commit")
def _wake_consumers(session: Session) -> None:
    for hand, lease in session.info.pop(_HAND_AFTER_COMMIT, ()):
        hand.reserved -= 1
        hand.handed.append(lease)
        hand.changed.set()
    for wakeup in session.info.pop(_WAKE_AFTER_COMMIT, ()):
        wakeup.set()


@event.listens_for(Session, "after_transaction_end")
def _forget_wake_ups(session: Session, transaction: SessionTransaction) -> None:
    # Rolled back, or closed without a commit: nothing was written, nothing is handed.
    if transaction.parent is None:
        session.info.pop(_WAKE_AFTER_COMMIT, None)
        _release(hand for hand, _ in session.info.pop(_HAND_AFTER_COMMIT, ()))


def _release(hands: Iterable[_Hand]) -> None:
    for hand in hands:
        hand.reserved -= 1
        hand.changed.set()


async def _first(tasks: set[asyncio.Task[None]], changed: asyncio.Event | None) -> None:
    """Until one of `tasks` ends or `changed` is set."""
    waiter = asyncio.ensure_future(changed.wait()) if changed is not None else None
    try:
        await asyncio.wait(
            {*tasks, *([waiter] if waiter else [])}, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        if waiter is not None:
            waiter.cancel()


class _Acks:
    """Deletes the rows of handled messages, those of `gap` seconds together."""

    def __init__(self, sessionmaker: Sessionmaker, gap: float) -> None:
        self._sessionmaker = sessionmaker
        self._gap = gap
        self._pending: list[_Lease] = []
        self._timer: asyncio.Task[None] | None = None
        # `flush` returns once what was pending is deleted. (Like the broker's events, it
        # takes its loop at its first wait; the timer is started anew in another loop, as
        # the group commit's drain is.)
        self._lock = asyncio.Lock()

    def add(self, lease: _Lease) -> None:
        self._pending.append(lease)
        timer, loop = self._timer, asyncio.get_running_loop()
        # A timer that `drain` has just cancelled is not done yet, but will not flush.
        if timer is None or timer.done() or timer.cancelling() or timer.get_loop() is not loop:
            self._timer = loop.create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self._gap)
            if not await self.flush():
                # The database is away: the rows stay leased meanwhile, and past their
                # lease the inbox drops a second handling.
                await asyncio.sleep(max(1.0, self._gap))

    async def drain(self) -> None:
        """Delete what is pending now, after any delete under way; the timer then stops
        until the next ack (a consumer stopping, or the process)."""
        await self.flush()
        if not self._pending and self._timer is not None:
            self._timer.cancel()

    async def flush(self) -> bool:
        """Delete what is pending now; False if that failed (kept for the next try)."""
        async with self._lock:
            leases, self._pending = self._pending, []
            if not leases:
                return True
            try:
                async with unit_of_work(self._sessionmaker) as session:
                    for start in range(0, len(leases), ACK_CHUNK):
                        await _delete_leased(session, leases[start : start + ACK_CHUNK])
            except Exception:
                log.exception("queue.ack_failed", messages=len(leases))
                self._pending = leases + self._pending
                return False
            return True


async def _delete_leased(session: AsyncSession, leases: Sequence[_Lease]) -> None:
    """Delete the messages still held under these leases (a lease run out and taken by
    another consumer keeps its message: that one's ack is the one that counts)."""
    await driver.execute(
        session, _DELETE_LEASED, {"leases": [(lease.id, lease.token) for lease in leases]}
    )


_QUEUE = table(QueueMessage)
# Built once with bound parameters (see `db.base.table`): every poll that finds work runs
# it, and building it anew cost about as much as running it. Several consumers of a queue
# claim at once (PostgreSQL): each takes rows nobody holds (SQLite has no row locks, and
# its compiler leaves them out).
_CLAIM = (
    update(_QUEUE)
    .where(
        _QUEUE.c.id.in_(
            select(_QUEUE.c.id)
            .where(
                _QUEUE.c.queue == bindparam("queue_name"),
                _QUEUE.c.dead_at.is_(None),
                _QUEUE.c.available_at <= bindparam("now"),
                unleased(_QUEUE.c.leased_until, bindparam("now")),
            )
            .order_by(_QUEUE.c.id)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
        )
    )
    .values(
        # (An UPDATE's parameters may not take its columns' names.)
        leased_until=bindparam("lease_end"),
        lease_token=bindparam("token"),
        deliveries=_QUEUE.c.deliveries + 1,
    )
    .returning(_QUEUE.c.id, _QUEUE.c.deliveries, _QUEUE.c.body)
)
_INSERT = insert(_QUEUE)
# The ids of rows handed over (RETURNING keeps no order: matched by queue and event).
_INSERT_RETURNING = insert(_QUEUE).returning(_QUEUE.c.id, _QUEUE.c.queue, _QUEUE.c.event_id)
_DELETE_LEASED = delete(_QUEUE).where(
    tuple_(_QUEUE.c.id, _QUEUE.c.lease_token).in_(bindparam("leases", expanding=True))
)


async def depth(session: AsyncSession, queue: str) -> int:
    """Messages waiting or in hand on a queue (for metrics and tests)."""
    result = await session.scalar(
        select(func.count())
        .select_from(QueueMessage)
        .where(QueueMessage.queue == queue, QueueMessage.dead_at.is_(None))
    )
    return int(result or 0)
