"""The transactional outbox: events are rows written with the state change they announce.

`add` runs inside the caller's transaction; the `Relay` publishes unsent rows and stamps
them sent, so a crash anywhere neither loses an event nor announces an uncommitted change.

Wake-ups: a relay polls every `poll_interval`, and is also woken as soon as a transaction
that added outbox rows commits: at once in the same process (`aigen up`), and through
PostgreSQL's `NOTIFY aigen_outbox` (sent on the committing connection just after the
commit, outside any lock) in other processes. A wake-up is only a hint; the poll stays
the guarantee, so a lost notice delays an event by one poll at most (a second, for a
relay that listens: `LISTENING_POLL_SECONDS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import structlog
from sqlalchemy import bindparam, event, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool
from sqlalchemy.util import await_only

from aigen.aio import sleep_or_stop, wait_any
from aigen.clock import utcnow
from aigen.db.base import table
from aigen.db.notices import listen_dsn
from aigen.db.session import Sessionmaker, is_postgres, unit_of_work
from aigen.models import OutboxMessage

from .broker import Broker, TransactionalPublisher
from .messages import Envelope, Message

log = structlog.get_logger(__name__)

CHANNEL = "aigen_outbox"
# session.info / pool record info: this transaction added outbox rows; notify on checkin.
_ADDED = "aigen.outbox.added"
_NOTIFY = "aigen.outbox.notify"
# Relays running in this process, woken when a transaction that added rows commits.
_running: weakref.WeakSet[Relay] = weakref.WeakSet()
MAX_GAP_SECONDS = 0.005
# How often a relay that listens for notices polls all the same; how soon one that
# could not listen, or lost its listening connection, tries again.
LISTENING_POLL_SECONDS = 1.0
LISTEN_RETRY_SECONDS = 5.0


def add(session: AsyncSession, message: Message, *, traceparent: str | None = None) -> Envelope:
    """Queue `message` for publication when the caller's transaction commits."""
    envelope = Envelope.wrap(message, traceparent=traceparent)
    session.add(OutboxMessage(**_row(envelope)))
    session.info[_ADDED] = True
    return envelope


async def add_many(session: AsyncSession, envelopes: Sequence[Envelope]) -> None:
    """`add` for many events at once: one multi-row INSERT, at once (not at the flush)."""
    if not envelopes:
        return
    await session.execute(_INSERT, [_row(e) for e in envelopes])
    session.info[_ADDED] = True


# The statements of every event, built once with bound parameters (see `db.base.table`).
_TABLE = table(OutboxMessage)
_INSERT = insert(_TABLE)
_UNSENT = (
    select(_TABLE.c.id, _TABLE.c.body)
    .where(_TABLE.c.sent_at.is_(None))
    .order_by(_TABLE.c.id)
    .limit(bindparam("batch"))
)
_UNSENT_SKIP_LOCKED = _UNSENT.with_for_update(skip_locked=True)
_MARK_SENT = (
    update(_TABLE)
    .where(_TABLE.c.id.in_(bindparam("ids", expanding=True)))
    .values(sent_at=bindparam("now"))
)


def _row(envelope: Envelope) -> dict[str, Any]:
    return {
        "event_id": envelope.id,
        "type": envelope.type,
        "routing_key": envelope.routing_key,
        "account_id": str(envelope.data.get("account_id")),
        "body": envelope.to_json(),
        "created_at": envelope.time,
    }


@event.listens_for(Session, "before_commit")
def _before_commit(session: Session) -> None:
    if not session.info.get(_ADDED):
        return
    # Mark the PostgreSQL connection: once it is back in the pool (the commit done, every
    # lock released) it sends the NOTIFY, so that other processes' relays wake up.
    connection = session.connection()
    info = connection.connection.record_info
    if connection.dialect.name == "postgresql" and info is not None:
        info[_NOTIFY] = True


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.info.pop(_ADDED, False):
        for relay in list(_running):
            relay.wake()


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_ADDED, None)


@event.listens_for(Pool, "checkin")
def _notify_on_checkin(dbapi_connection: Any, record: Any) -> None:
    if record is None or not record.record_info.pop(_NOTIFY, False) or dbapi_connection is None:
        return
    with contextlib.suppress(Exception):
        # Outside a transaction: delivered at once. A failure only costs a poll's delay.
        await_only(dbapi_connection.driver_connection.execute(f"NOTIFY {CHANNEL}"))


class Relay:
    """Moves committed outbox rows to the broker; any number may run at once."""

    def __init__(
        self,
        sessionmaker: Sessionmaker,
        broker: Broker,
        *,
        batch: int = 100,
        poll_interval: float = 0.05,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._broker = broker
        self._batch = batch
        self._poll_interval = poll_interval
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
            # Several relays share the table (PostgreSQL): each takes rows nobody else holds.
            statement = _UNSENT_SKIP_LOCKED if is_postgres(session) else _UNSENT
            rows = (await session.execute(statement, {"batch": self._batch})).all()
            if not rows:
                return 0
            envelopes = [Envelope.from_json(body) for _, body in rows]
            if isinstance(self._broker, TransactionalPublisher):
                await self._broker.publish_in(session, envelopes)
            else:
                await self._broker.publish(envelopes)
            await session.execute(
                _MARK_SENT, {"ids": [row_id for row_id, _ in rows], "now": utcnow()}
            )
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        _running.add(self)
        dsn = listen_dsn(self._sessionmaker)
        listener = await self._listen(dsn) if dsn else None
        # A connection lost is replaced at once; a failed try is repeated a while later.
        listen_again_at = time.monotonic() + (LISTEN_RETRY_SECONDS if listener is None else 0)
        try:
            while not stop.is_set():
                started = time.monotonic()
                lost = listener is None or listener.is_closed()
                if dsn and lost and started >= listen_again_at:
                    # Never listened, or the server closed the connection (a restart, say):
                    # listen again, and meanwhile poll at the short interval.
                    listener = await self._listen(dsn)
                    if listener is None:
                        listen_again_at = started + LISTEN_RETRY_SECONDS
                # With PostgreSQL's notices every commit wakes the relay: the poll is then
                # only the net for a lost notice, and need not run 20 times a second.
                poll = self._poll_interval
                if listener is not None and not listener.is_closed():
                    poll = max(poll, LISTENING_POLL_SECONDS)
                try:
                    sent = await self.run_once()
                except Exception:
                    log.exception("relay.publish_failed")
                    sent = 0
                    await sleep_or_stop(stop, 1.0)
                if sent < self._batch:
                    self.wakeup.clear()
                    await wait_any(poll, stop, self.wakeup)
                    gap = self._min_gap - (time.monotonic() - started)
                    if gap > 0 and not stop.is_set():
                        await asyncio.sleep(gap)
        finally:
            _running.discard(self)
            if listener is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(listener.close(), 5)

    async def _listen(self, dsn: str) -> Any:
        """`LISTEN aigen_outbox` on a connection of its own; None when that fails."""
        try:
            connection = await asyncio.wait_for(asyncpg.connect(dsn), 10)
            await connection.add_listener(CHANNEL, lambda *_: self.wake())
            # Lost (a server restart, say): run at once, to listen again (`run`).
            connection.add_termination_listener(lambda *_: self.wake())
        except Exception as error:
            # Polling alone still publishes everything, one poll later.
            log.warning("relay.listen_failed", error=repr(error))
            return None
        return connection
