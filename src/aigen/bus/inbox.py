"""Consumer-side deduplication: an event is applied once per consumer, by its id."""

from __future__ import annotations

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.clock import utcnow
from aigen.db.session import is_postgres
from aigen.models import InboxMessage


async def first_time(session: AsyncSession, consumer: str, event_id: str) -> bool:
    """Record the event in the caller's transaction; False when it was applied before.

    The row commits (or rolls back) with the consumer's own changes, so "applied" and
    "recorded" can never disagree. One `INSERT … ON CONFLICT DO NOTHING`: a duplicate
    that is still being applied by another transaction makes this one wait for it, and
    then find the row (False) if it committed, or insert it (True) if it rolled back.
    """
    insert = pg_insert if is_postgres(session) else sqlite_insert
    inserted = await session.scalar(
        insert(InboxMessage)
        .values(consumer=consumer, event_id=event_id, processed_at=utcnow())
        .on_conflict_do_nothing(index_elements=["consumer", "event_id"])
        .returning(InboxMessage.event_id)
    )
    return inserted is not None
