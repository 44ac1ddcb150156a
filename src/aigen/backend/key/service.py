"""API keys (DESIGN §6): shown once, stored as HMAC-SHA256, scoped, expiring, revocable."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.clock import utcnow
from aigen.errors import NotFound, Unprocessable
from aigen.ids import new_id
from aigen.models import Account, ApiKey
from aigen.tokens import display_prefix, hash_api_key, new_api_key

SCOPES = frozenset({"generate", "read", "webhooks"})


class ApiKeyNotFoundError(NotFound):
    code = "api_key_not_found"
    title = "API key not found"


async def create(
    session: AsyncSession,
    *,
    account_id: str,
    secret: str,
    scopes: list[str] | None = None,
    name: str | None = None,
    rpm: int | None = None,
    concurrency: int | None = None,
    jobs_per_day: int | None = None,
    jobs_per_month: int | None = None,
    credits_per_day: int | None = None,
    credits_per_month: int | None = None,
    expires_in_days: float | None = None,
    live: bool = True,
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the key itself, which is never stored."""
    chosen = scopes or sorted(SCOPES)
    unknown = set(chosen) - SCOPES
    if unknown:
        raise Unprocessable(f"unknown scopes: {', '.join(sorted(unknown))}")
    if await session.get(Account, account_id) is None:
        raise NotFound(f"no account {account_id}")
    plaintext = new_api_key(live=live)
    expires_at = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    row = ApiKey(
        id=new_id("key"),
        account_id=account_id,
        key_hash=hash_api_key(plaintext, secret=secret),
        prefix=display_prefix(plaintext),
        last4=plaintext[-4:],
        name=name,
        scopes=",".join(sorted(chosen)),
        rpm=rpm,
        concurrency=concurrency,
        jobs_per_day=jobs_per_day,
        jobs_per_month=jobs_per_month,
        credits_per_day=credits_per_day,
        credits_per_month=credits_per_month,
        expires_at=expires_at,
    )
    session.add(row)
    await session.flush()
    return row, plaintext


async def find(session: AsyncSession, plaintext: str, *, secret: str) -> ApiKey | None:
    digest = hash_api_key(plaintext, secret=secret)
    return await session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))


async def revoke(session: AsyncSession, key_id: str) -> ApiKey:
    row = await session.get(ApiKey, key_id)
    if row is None:
        raise ApiKeyNotFoundError(f"no API key {key_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        await session.flush()
    return row


async def list_for(session: AsyncSession, account_id: str) -> list[ApiKey]:
    statement = select(ApiKey).where(ApiKey.account_id == account_id).order_by(ApiKey.id)
    return list((await session.scalars(statement)).all())


async def touch(session: AsyncSession, key_id: str, when: datetime) -> None:
    """Stamp `last_used_at`; callers do it at most once a minute per key."""
    await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when))
