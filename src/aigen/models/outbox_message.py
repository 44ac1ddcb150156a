from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from aigen.clock import utcnow
from aigen.db.base import BigIntPK, Model


class OutboxMessage(Model):
    """An event written in the same transaction as the state change it announces.

    The relay publishes unsent rows and stamps `sent_at`. A row written by a process that
    publishes its own events once they commit (`aigen.bus.publisher`) carries
    `dispatch_until`: the relay leaves it to that process until then. Rows are kept (not
    deleted) so that `GET /v1/events` can serve an account's feed from them.
    """

    __tablename__ = "outbox_messages"
    __table_args__ = (
        Index(
            "ix_outbox_messages_unsent",
            "id",
            sqlite_where=text("sent_at IS NULL"),
            postgresql_where=text("sent_at IS NULL"),
        ),
        Index("ix_outbox_messages_account_id_id", "account_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(40), unique=True)
    type: Mapped[str] = mapped_column(String(80))
    routing_key: Mapped[str] = mapped_column(String(80))
    account_id: Mapped[str | None] = mapped_column(String(40), default=None)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)
    dispatch_until: Mapped[datetime | None] = mapped_column(default=None)
