"""The transactional outbox: events are rows written with the state change they announce.

`add` runs inside the caller's transaction; the `Relay` publishes unsent rows and stamps
them sent, so a crash anywhere neither loses an event nor announces an uncommitted change.
"""

from __future__ import annotations

import asyncio

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.aio import sleep_or_stop, wait_any
from aigen.clock import utcnow
from aigen.db.session import Sessionmaker, is_postgres, unit_of_work
from aigen.models import OutboxMessage

from .broker import Broker, TransactionalPublisher
from .messages import Envelope, Message

log = structlog.get_logger(__name__)


def add(session: AsyncSession, message: Message, *, traceparent: str | None = None) -> Envelope:
    """Queue `message` for publication when the caller's transaction commits."""
    envelope = Envelope.wrap(message, traceparent=traceparent)
    session.add(
        OutboxMessage(
            event_id=envelope.id,
            type=envelope.type,
            routing_key=envelope.routing_key,
            account_id=str(envelope.data.get("account_id")),
            body=envelope.to_json(),
            created_at=envelope.time,
        )
    )
    return envelope


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
        self.wakeup = asyncio.Event()

    async def run_once(self) -> int:
        """Publish one batch; returns how many rows were sent."""
        async with unit_of_work(self._sessionmaker) as session:
            statement = (
                select(OutboxMessage.id, OutboxMessage.body)
                .where(OutboxMessage.sent_at.is_(None))
                .order_by(OutboxMessage.id)
                .limit(self._batch)
            )
            if is_postgres(session):
                # Several relays share the table: each takes rows nobody else holds.
                statement = statement.with_for_update(skip_locked=True)
            rows = (await session.execute(statement)).all()
            if not rows:
                return 0
            envelopes = [Envelope.from_json(body) for _, body in rows]
            if isinstance(self._broker, TransactionalPublisher):
                await self._broker.publish_in(session, envelopes)
            else:
                await self._broker.publish(envelopes)
            await session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id.in_([row_id for row_id, _ in rows]))
                .values(sent_at=utcnow())
            )
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                sent = await self.run_once()
            except Exception:
                log.exception("relay.publish_failed")
                sent = 0
                await sleep_or_stop(stop, 1.0)
            if sent < self._batch:
                self.wakeup.clear()
                await wait_any(self._poll_interval, stop, self.wakeup)
