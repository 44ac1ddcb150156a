"""Accounts: the customers that own keys, credits and jobs."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.backend.billing import service as billing
from aigen.ids import new_id
from aigen.models import Account
from aigen.tokens import new_webhook_secret


async def create(session: AsyncSession, name: str, *, credits: int = 0) -> Account:
    account = Account(
        id=new_id("acc"), name=name, status="active", balance=0, webhook_secret=new_webhook_secret()
    )
    session.add(account)
    await session.flush()
    if credits:
        await billing.grant(session, account.id, credits, note="initial credits")
    await session.refresh(account)
    return account


async def get(session: AsyncSession, account_id: str) -> Account | None:
    return await session.scalar(select(Account).where(Account.id == account_id))


async def list_all(session: AsyncSession) -> list[Account]:
    return list((await session.scalars(select(Account).order_by(Account.id))).all())
