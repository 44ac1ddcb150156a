"""The outbox's fast path: a process publishes the events it wrote once they commit.

The relay (`aigen.bus.outbox`) moves a row to the broker after a notice from the
committing process, a transaction of its own to take the row, and the publish: a hop
between processes and a transaction per batch. An `OutboxPublisher` attached to a
process's sessionmaker saves that hop, as MassTransit's and NServiceBus's outboxes
dispatch after the commit. The rows its transactions add carry `dispatch_until`, a
lease: until then the relay leaves them alone. Once the transaction has committed, the
events (in memory still) are published with confirms, and their rows are stamped sent
within a second, many in one statement.

Nothing is lost and the contract stays at least once:

- the transaction rolls back: nothing was written, nothing is published;
- the process dies after the commit, or the publish fails: the rows stay unsent, and a
  relay publishes them once the lease has run out (after a failed publish, at once:
  the lease is given back, and for a pause the process writes its events without one);
- the process dies after the publish but before the stamp: a relay publishes them
  again after the lease, and the consumers' inbox rows drop the second copy.

Only for a broker outside the database (RabbitMQ): the database queue is written in the
relay's own transaction (`TransactionalPublisher`), exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import bindparam, event, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from aigen.aio import wait_any
from aigen.clock import utcnow
from aigen.db import driver
from aigen.db.base import table
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import OutboxMessage

from .broker import Broker
from .messages import Envelope

log = structlog.get_logger(__name__)

# How long the relay leaves a row to the process that wrote it: far longer than a
# publish takes, short enough that a crashed process's events go out soon after.
LEASE_SECONDS = 10.0
# The sent stamps wait this long to share a statement: they only keep the relay off once
# the lease ends, so a second (a tenth of the lease) is soon enough, and below the
# maximum it makes one transaction of many events' stamps instead of one each.
STAMP_GAP_SECONDS = 1.0
# Publishes start at most this often, as the relay's do: under load the commits of a few
# milliseconds then share one publish (a message alone costs about twice the CPU of one
# in eight); an event after a quiet spell goes out at once.
MIN_GAP_SECONDS = 0.005
# After a failed publish the process leaves its events to the relay for this long (the
# relay retries on its own), doubling while publishes keep failing, up to the maximum.
PAUSE_SECONDS = 1.0
MAX_PAUSE_SECONDS = 30.0
# session.info: the publisher of the session's process; the events to hand it on commit.
_PUBLISHER = "aigen.outbox.publisher"
_HANDED = "aigen.outbox.handed"

_TABLE = table(OutboxMessage)
_STAMP = (
    update(_TABLE)
    .where(_TABLE.c.event_id.in_(bindparam("event_ids", expanding=True)))
    .values(sent_at=bindparam("now"))
)
_RELEASE = (
    update(_TABLE)
    .where(
        _TABLE.c.event_id.in_(bindparam("event_ids", expanding=True)),
        _TABLE.c.sent_at.is_(None),
    )
    .values(dispatch_until=None)
)


def lease(session: AsyncSession, now: datetime) -> datetime | None:
    """The `dispatch_until` of rows added in `session` now: None without a publisher."""
    publisher: OutboxPublisher | None = session.info.get(_PUBLISHER)
    return None if publisher is None else now + timedelta(seconds=publisher.lease_seconds)


def hand_on_commit(session: AsyncSession, envelopes: Sequence[Envelope]) -> bool:
    """Give `envelopes` to the session's publisher once the transaction commits; False
    when the session has none (the relay then publishes them). Only the outermost
    transaction counts: no code here adds events inside a SAVEPOINT, whose rollback
    would not take them back."""
    if _PUBLISHER not in session.info:
        return False
    session.info.setdefault(_HANDED, []).extend(envelopes)
    return True


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    handed: list[Envelope] | None = session.info.pop(_HANDED, None)
    if handed:
        session.info[_PUBLISHER].hand(handed)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_HANDED, None)


class OutboxPublisher:
    """Publishes the events of its process's transactions as they commit (`run`)."""

    def __init__(
        self,
        sessionmaker: Sessionmaker,
        broker: Broker,
        *,
        lease_seconds: float = LEASE_SECONDS,
        stamp_gap: float = STAMP_GAP_SECONDS,
        min_gap: float = MIN_GAP_SECONDS,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._broker = broker
        self.lease_seconds = lease_seconds
        self._stamp_gap = stamp_gap
        self._min_gap = min_gap
        self._queue: list[Envelope] = []
        self._published: list[str] = []
        self._wakeup = asyncio.Event()

    def hand(self, envelopes: Sequence[Envelope]) -> None:
        """Committed events to publish (called by the commit, in this process)."""
        self._queue.extend(envelopes)
        self._wakeup.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Attach to the sessionmaker and publish until `stop`; then detach, publish what
        was handed meanwhile and stamp it (what comes later waits for the relay).

        While publishes fail (the broker is away) it detaches for a pause: the process's
        events are then written without a lease and the relay, which retries on its own,
        publishes them."""
        info: dict[str, Any] = self._sessionmaker.kw.setdefault("info", {})
        info[_PUBLISHER] = self
        stamped_at = published_at = time.monotonic()
        pause = PAUSE_SECONDS
        try:
            while not stop.is_set():
                if not self._queue:
                    wait = self._stamp_gap - (time.monotonic() - stamped_at)
                    await wait_any(max(wait, 0.0) if self._published else None, stop, self._wakeup)
                self._wakeup.clear()
                gap = self._min_gap - (time.monotonic() - published_at)
                if self._queue and gap > 0:
                    await wait_any(gap, stop)
                if self._queue:
                    published_at = time.monotonic()
                    if await self._publish():
                        pause = PAUSE_SECONDS
                    else:
                        info.pop(_PUBLISHER, None)
                        await wait_any(pause, stop)
                        pause = min(MAX_PAUSE_SECONDS, pause * 2)
                        info[_PUBLISHER] = self
                if self._published and time.monotonic() - stamped_at >= self._stamp_gap:
                    await self._stamp()
                    stamped_at = time.monotonic()
        finally:
            if info.get(_PUBLISHER) is self:
                del info[_PUBLISHER]
            await self._publish()
            await self._stamp()

    async def _publish(self) -> bool:
        """Publish what was handed; False if that failed (the rows then go to the relay)."""
        envelopes, self._queue = self._queue, []
        if not envelopes:
            return True
        try:
            await self._broker.publish(envelopes)
        except Exception as error:
            log.warning("outbox.publish_failed", events=len(envelopes), error=repr(error))
            await self._release([envelope.id for envelope in envelopes])
            return False
        self._published += [envelope.id for envelope in envelopes]
        return True

    async def _stamp(self) -> None:
        """Stamp the published rows sent; kept for the next try if that fails."""
        event_ids, self._published = self._published, []
        if not event_ids:
            return
        try:
            # One statement, which commits by itself: BEGIN and COMMIT would be two of
            # the three round trips, and below a job a second this runs for each job.
            async with unit_of_work(self._sessionmaker, alone=True) as session:
                params = {"event_ids": event_ids, "now": utcnow()}
                await driver.execute(session, _STAMP, params, alone=True)
        except Exception:
            # Unstamped, the rows go out again from a relay after their lease: a
            # duplicate the consumers drop, never a loss.
            log.exception("outbox.stamp_failed", events=len(event_ids))
            self._published = event_ids + self._published

    async def _release(self, event_ids: list[str]) -> None:
        """A publish failed: the relay may take the rows now rather than after the lease."""
        try:
            async with unit_of_work(self._sessionmaker, alone=True) as session:
                await driver.execute(session, _RELEASE, {"event_ids": event_ids}, alone=True)
        except Exception:
            log.exception("outbox.release_failed", events=len(event_ids))
