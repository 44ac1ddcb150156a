"""Consumer-side deduplication: an event is applied once per consumer, by its id."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.models import InboxMessage


async def first_time(session: AsyncSession, consumer: str, event_id: str) -> bool:
    """Record the event in the caller's transaction; False when it was applied before.

    The row commits (or rolls back) with the consumer's own changes, so "applied" and
    "recorded" can never disagree. The primary key turns a concurrent duplicate into an
    integrity error, which fails that transaction and leads to a redelivery that then
    finds the row.
    """
    seen = await session.scalar(
        select(InboxMessage.event_id).where(
            InboxMessage.consumer == consumer, InboxMessage.event_id == event_id
        )
    )
    if seen is not None:
        return False
    session.add(InboxMessage(consumer=consumer, event_id=event_id))
    await session.flush()
    return True
