"""Helpers for the notification tests: a payload builder, reads of the stored state, waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.clock import utcnow
from aigen.db.session import Sessionmaker
from aigen.models import Job, WebhookAttempt, WebhookDelivery


async def build_payload(session: AsyncSession, delivery: WebhookDelivery) -> dict[str, Any]:
    """A payload builder as the notifier wires one: the job, read in the given session."""
    job = await session.get(Job, delivery.job_id)
    assert job is not None
    return {
        "type": delivery.event_type,
        "timestamp": utcnow().isoformat(),
        "data": {"id": job.id, "status": job.status, "model": job.model},
    }


async def load_deliveries(sessionmaker: Sessionmaker) -> list[WebhookDelivery]:
    async with sessionmaker() as session:
        return list(await session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


async def load_attempts(sessionmaker: Sessionmaker, delivery_id: str) -> list[WebhookAttempt]:
    async with sessionmaker() as session:
        rows = await session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id == delivery_id)
            .order_by(WebhookAttempt.id)
        )
        return list(rows)


async def settled(sessionmaker: Sessionmaker) -> bool:
    """True when no delivery is pending any more."""
    return all(d.status != "pending" for d in await load_deliveries(sessionmaker))


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 10.0, every: float = 0.02
) -> None:
    """Wait until `check()` is true; fail the test after `within` seconds."""
    async with asyncio.timeout(within):
        # The state lives in the database, where no event can be awaited: poll it.
        while not await check():
            await asyncio.sleep(every)
