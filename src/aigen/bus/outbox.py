"""The transactional outbox: events are rows written with the state change they announce.

`add` runs inside the caller's transaction; the `Relay` publishes unsent rows and stamps
them sent, so a crash anywhere neither loses an event nor announces an uncommitted change.

Wake-ups: a relay polls every `poll_interval` while it finds rows, less often when idle
(`aigen.aio.IdlePoll`, down to once a second), and is also woken as soon as a transaction
that added outbox rows commits: at once in the same process (`aigen up`), and through
PostgreSQL's notices on `aigen_outbox` (sent on the committing connection just after the
commit, outside any lock) in other processes; `aigen.db.notices` does both. A wake-up is
only a hint; the poll stays the guarantee, so a lost notice delays an event by one poll
at most (a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.aio import IDLE_POLL_MAX_SECONDS, IdlePoll, sleep_or_stop, wait_any
from aigen.clock import utcnow
from aigen.db import driver, notices, together
from aigen.db.base import table, unleased
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import OutboxMessage

from . import publisher
from .broker import Broker, TransactionalPublisher
from .messages import Envelope, Message

log = structlog.get_logger(__name__)

# The notice channel (`aigen.db.notices`) of commits that added outbox rows.
CHANNEL = "aigen_outbox"
MAX_GAP_SECONDS = 0.005
# How often a relay that listens for notices on PostgreSQL polls all the same.
LISTENING_POLL_SECONDS = 1.0
# session.info: the queue that `add_many` writes to directly (`write_through`).
_WRITE_THROUGH = "aigen.outbox.write_through"


def add(session: AsyncSession, message: Message, *, traceparent: str | None = None) -> Envelope:
    """Queue `message` for publication when the caller's transaction commits."""
    envelope = Envelope.wrap(message, traceparent=traceparent)
    session.add(OutboxMessage(**_row(envelope, publisher.lease(session, envelope.time))))
    _publish_on_commit(session, [envelope])
    return envelope


async def add_many(session: AsyncSession, envelopes: Sequence[Envelope]) -> None:
    """`add` for many events at once: one multi-row INSERT, at once (not at the flush)."""
    if not envelopes:
        return
    queue: TransactionalPublisher | None = session.info.get(_WRITE_THROUGH)
    if queue is not None:
        # The queue is in this database: its rows go in with the events', in this
        # transaction, and the events' rows are born sent (they stay for the event feed).
        now = utcnow()
        await driver.execute(session, _INSERT, [_row(e, sent_at=now) for e in envelopes])
        await queue.publish_in(session, envelopes)
        return
    await together.write(session, [adding(session, envelopes)])
    added(session, envelopes)


def adding(session: AsyncSession, envelopes: Sequence[Envelope]) -> together.Write:
    """`add_many`'s INSERT, for a caller that sends it with writes of its own
    (`db.together`); once it has run, `added` hands the events on at the commit. Not for
    a session whose events go into the embedded queue (`write_through`): `add_many`."""
    assert not writes_through(session), "write-through: use add_many"
    until = publisher.lease(session, utcnow())
    return _INSERT, [_row(e, until) for e in envelopes]


def added(session: AsyncSession, envelopes: Sequence[Envelope]) -> None:
    """The events of `adding`'s rows, written: published once the transaction commits."""
    _publish_on_commit(session, envelopes)


def writes_through(session: AsyncSession) -> bool:
    """Whether this session's events go into the embedded queue (`write_through`)."""
    return session.info.get(_WRITE_THROUGH) is not None


@contextlib.contextmanager
def write_through(sessionmaker: Sessionmaker, queue: TransactionalPublisher) -> Iterator[None]:
    """While in the block, the events that `add_many` adds in `sessionmaker`'s sessions
    go into `queue` (the embedded queue, in the same database) in their own transaction.

    The relay's hop (a notice, a transaction that takes the rows and writes the queue's)
    cost `aigen up` a write transaction per batch of events, behind SQLite's one write
    lock, and a few milliseconds of each event's way. Exactly once, as before: the queue
    rows commit or roll back with the change they announce. `add`, for the rare events
    (a cancel, an expiry), still leaves its rows to the relay.
    """
    info: dict[str, Any] = sessionmaker.kw.setdefault("info", {})
    info[_WRITE_THROUGH] = queue
    try:
        yield
    finally:
        if info.get(_WRITE_THROUGH) is queue:
            del info[_WRITE_THROUGH]


def _publish_on_commit(session: AsyncSession, envelopes: Sequence[Envelope]) -> None:
    # The process's own publisher, if it runs one, takes them once committed; else the
    # relay, woken by the commit's notice.
    if not publisher.hand_on_commit(session, envelopes):
        notices.after_commit(session, CHANNEL)


# The statements of every event, built once with bound parameters (see `db.base.table`).
_TABLE = table(OutboxMessage)
_INSERT = insert(_TABLE)
# The oldest unsent rows, stamped sent, with their bodies: one round trip where a read
# and then an UPDATE took two. Several relays share the table (PostgreSQL): each takes
# rows nobody else holds (SQLite has no row locks, and its compiler leaves them out).
_TAKE = (
    update(_TABLE)
    .where(
        _TABLE.c.id.in_(
            select(_TABLE.c.id)
            .where(
                _TABLE.c.sent_at.is_(None),
                # Left to the process that wrote it until its lease ends (`publisher`).
                unleased(_TABLE.c.dispatch_until, bindparam("now")),
            )
            .order_by(_TABLE.c.id)
            .limit(bindparam("batch"))
            .with_for_update(skip_locked=True)
        )
    )
    .values(sent_at=bindparam("now"))
    .returning(_TABLE.c.id, _TABLE.c.body)
)


def _row(
    envelope: Envelope, dispatch_until: datetime | None = None, *, sent_at: datetime | None = None
) -> dict[str, Any]:
    return {
        "event_id": envelope.id,
        "type": envelope.type,
        "routing_key": envelope.routing_key,
        "account_id": str(envelope.data.get("account_id")),
        "body": envelope.to_json(),
        "created_at": envelope.time,
        "dispatch_until": dispatch_until,
        "sent_at": sent_at,
    }


class Relay:
    """Moves committed outbox rows to the broker; any number may run at once."""

    def __init__(
        self,
        sessionmaker: Sessionmaker,
        broker: Broker,
        *,
        batch: int = 100,
        poll_interval: float = 0.05,
        idle_poll_max: float = IDLE_POLL_MAX_SECONDS,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._broker = broker
        self._batch = batch
        self._poll_interval = poll_interval
        self._idle_poll_max = idle_poll_max
        # After a wake-up the relay runs at most this often (5 ms at the default poll),
        # so that a burst of commits makes batches rather than one transaction per event.
        self._min_gap = min(poll_interval / 10, MAX_GAP_SECONDS)
        self.wakeup = asyncio.Event()

    def wake(self) -> None:
        """Run soon: a transaction that added outbox rows has committed."""
        self.wakeup.set()

    async def run_once(self) -> int:
        """Publish one batch; returns how many rows were sent."""
        async with unit_of_work(self._sessionmaker) as session:
            # The rows are stamped sent as they are taken, in one statement; a publish
            # that fails rolls the stamp back with the rest.
            taken = await session.execute(_TAKE, {"batch": self._batch, "now": utcnow()})
            # RETURNING keeps no order: the events go out in the order they were added.
            rows = sorted(taken.all())
            if not rows:
                return 0
            envelopes = [Envelope.from_json(body) for _, body in rows]
            if isinstance(self._broker, TransactionalPublisher):
                await self._broker.publish_in(session, envelopes)
            else:
                await self._broker.publish(envelopes)
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        # Woken by every commit that added rows: in this process at once, and in others
        # through PostgreSQL's notices; also when the listening connection is lost.
        listener = notices.Listener(CHANNEL, self._sessionmaker, on_notice=self.wake)
        listening = asyncio.create_task(listener.run(stop))
        # An idle relay looks less and less often (`IdlePoll`); a commit in this process
        # still wakes it at once.
        idle = IdlePoll(self._poll_interval, self._idle_poll_max)
        try:
            while not stop.is_set():
                started = time.monotonic()
                # Cleared before the look, not after: a commit during it then ends the
                # wait below at once, instead of waiting for the poll.
                self.wakeup.clear()
                try:
                    sent = await self.run_once()
                except Exception:
                    log.exception("relay.publish_failed")
                    sent = 0
                    await sleep_or_stop(stop, 1.0)
                poll = idle.after(found=sent > 0)
                if listener.connected:
                    # With PostgreSQL's notices every commit wakes the relay: the poll is
                    # then only the net for a lost notice.
                    poll = max(poll, LISTENING_POLL_SECONDS)
                if sent < self._batch:
                    await wait_any(poll, stop, self.wakeup)
                    gap = self._min_gap - (time.monotonic() - started)
                    if gap > 0 and not stop.is_set():
                        await asyncio.sleep(gap)
        finally:
            if not listening.done():
                listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
