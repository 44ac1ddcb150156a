"""The `database` broker: the embedded queue, kept in the `queue_messages` table.

Each published event becomes one row per bound consumer queue. A consumer leases rows
(`leased_until`, a `lease_token` of its own), keeps the lease alive while its handler
runs, and deletes the row after the handler's commit (ack). A consumer that dies simply
lets the lease run out and another takes the row: at-least-once across restarts, with
the consumers' inbox rows making a second application a no-op.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import structlog
from sqlalchemy import bindparam, delete, event, func, insert, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from aigen.aio import IDLE_POLL_MAX_SECONDS, IdlePoll, sleep_or_stop, wait_any
from aigen.clock import utcnow
from aigen.db.base import table, unleased
from aigen.db.group import GroupCommit
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import QueueMessage

from .broker import DeadLetterHook, Handler, Retry
from .messages import Envelope
from .topology import dead_letter_queue, queues_for

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Lease:
    id: int
    token: str
    deliveries: int
    body: str


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
        # The acks of the messages handled together are one DELETE in one transaction:
        # with SQLite every transaction queues for the one write lock, and an ack each
        # made a third of the transactions of a job in `aigen up`.
        self._acks = GroupCommit(sessionmaker)

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
        (`outbox.write_through`), or the relay's, which marks their rows sent in it."""
        now = utcnow()
        rows = [
            {
                "queue": queue,
                "event_id": envelope.id,
                "routing_key": envelope.routing_key,
                "body": envelope.to_json(),
                "available_at": now,
                "created_at": now,
                "deliveries": 0,
            }
            for envelope in envelopes
            for queue in queues_for(envelope.routing_key)
        ]
        if rows:
            await session.execute(insert(QueueMessage), rows)
            # Woken once the rows are committed: a consumer woken before would find
            # nothing (PostgreSQL), and then wait for its next poll.
            waking: list[asyncio.Event] = session.info.setdefault(_WAKE_AFTER_COMMIT, [])
            waking.extend(self._wakeup(str(queue)) for queue in {row["queue"] for row in rows})

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
        # A queue found empty is asked less and less often; a publish in this process
        # still wakes it at once (`wakeup`), and so does a retry when it falls due.
        idle = IdlePoll(self._poll, self._idle_poll_max)
        while not stop.is_set():
            free = prefetch - len(in_flight)
            if free <= 0 and in_flight:
                # Full: wait for a slot rather than polling the table.
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                continue
            # Cleared before the claim, not after an empty one: a publish during the claim
            # then ends the wait below at once, instead of being lost until the next poll.
            wakeup.clear()
            try:
                leases = await self._claim(queue, free)
            except Exception:
                log.exception("queue.claim_failed", queue=queue)
                await sleep_or_stop(stop, 1.0)
                continue
            for lease in leases:
                task = asyncio.create_task(self._handle(queue, lease, handler, on_dead_letter))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            poll = idle.after(found=bool(leases))
            if len(leases) == free:
                continue  # a full claim: more may be waiting
            # Fewer than asked for: the queue held no more. Claiming again at once found
            # nothing but cost a write transaction, for each batch of each queue; a
            # publish in this process, or the next poll, ends the wait instead.
            await wait_any(poll, stop, wakeup)
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)

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
            result = await session.execute(_CLAIM, params)
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
            await self._ack(lease)
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

    async def _ack(self, lease: _Lease) -> None:
        await self._acks.run_batched(_delete_leased, lease)

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


# The consumers' wake-ups that a transaction sets when it commits (`publish_in`).
_WAKE_AFTER_COMMIT = "aigen.queue.wake_after_commit"


@event.listens_for(Session, "after_commit")
def _wake_consumers(session: Session) -> None:
    for wakeup in session.info.pop(_WAKE_AFTER_COMMIT, ()):
        wakeup.set()


@event.listens_for(Session, "after_rollback")
def _forget_wake_ups(session: Session) -> None:
    session.info.pop(_WAKE_AFTER_COMMIT, None)


async def _delete_leased(session: AsyncSession, leases: Sequence[_Lease]) -> list[None]:
    """Delete the messages still held under these leases (a lease run out and taken by
    another consumer keeps its message: that one's ack is the one that counts)."""
    await session.execute(_DELETE_LEASED, {"leases": [(lease.id, lease.token) for lease in leases]})
    return [None] * len(leases)


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
