"""Rows for the notification tests, written straight through the ORM (flushed, not committed)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from aigen.clock import utcnow
from aigen.ids import new_id
from aigen.models import Account, Job, WebhookEndpoint
from aigen.notifications.signing import new_secret


async def create_account(session: AsyncSession, *, name: str = "acme") -> Account:
    account = Account(id=new_id("acc"), name=name, balance=0, webhook_secret=new_secret())
    session.add(account)
    await session.flush()
    return account


async def create_job(
    session: AsyncSession,
    account: Account,
    *,
    status: str = "completed",
    webhook_url: str | None = None,
    webhook_events: list[str] | None = None,
) -> Job:
    job = Job(
        id=new_id("job"),
        account_id=account.id,
        api_key_id=new_id("key"),
        model="scripted-text",
        task="text",
        input={"prompt": "hello"},
        status=status,
        webhook_url=webhook_url,
        webhook_events=webhook_events,
    )
    session.add(job)
    await session.flush()
    return job


async def create_endpoint(
    session: AsyncSession,
    account: Account,
    *,
    url: str,
    events: list[str] | None = None,
    secret: str | None = None,
    previous_secret: str | None = None,
    previous_secret_expires_at: datetime | None = None,
    **values: Any,
) -> WebhookEndpoint:
    endpoint = WebhookEndpoint(
        id=new_id("ep"),
        account_id=account.id,
        url=url,
        events=events,
        secret=secret or new_secret(),
        previous_secret=previous_secret,
        previous_secret_expires_at=previous_secret_expires_at,
        created_at=utcnow(),
        updated_at=utcnow(),
        **values,
    )
    session.add(endpoint)
    await session.flush()
    return endpoint
