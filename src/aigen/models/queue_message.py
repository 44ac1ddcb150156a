from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from aigen.clock import utcnow
from aigen.db.base import BigIntPK, Model


class QueueMessage(Model):
    """One delivery of an event to one consumer queue of the `database` broker.

    A consumer leases a row (`leased_until`), and deletes it after its own commit (ack).
    A lease that runs out makes the row visible again, so a killed consumer loses nothing.
    Rows past the delivery limit move to `<queue>.dlq` with `dead_at` set.
    """

    __tablename__ = "queue_messages"
    __table_args__ = (Index("ix_queue_messages_queue_available_at", "queue", "available_at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    queue: Mapped[str] = mapped_column(String(80))
    event_id: Mapped[str] = mapped_column(String(40))
    routing_key: Mapped[str] = mapped_column(String(80))
    body: Mapped[str] = mapped_column(Text)
    available_at: Mapped[datetime] = mapped_column(default=utcnow)
    leased_until: Mapped[datetime | None] = mapped_column(default=None)
    lease_token: Mapped[str | None] = mapped_column(String(40), default=None)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    dead_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
