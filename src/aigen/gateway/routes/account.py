"""`GET /v1/account` and the account's default webhook secret."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import func, select

from aigen.backend.billing import service as billing
from aigen.gateway.auth import JobsRead, WebhooksWrite
from aigen.gateway.deps import SessionDep
from aigen.models import Account, Job
from aigen.models.job import ACTIVE

router = APIRouter(prefix="/v1", tags=["account"])


class Limits(BaseModel):
    requests_per_minute: int
    concurrent_jobs: int
    concurrent_jobs_in_use: int


class AccountOut(BaseModel):
    id: str
    object: Literal["account"] = "account"
    name: str
    status: str
    balance: int
    key_id: str
    limits: Limits


class WebhookSecret(BaseModel):
    key: str


@router.get("/account", response_model=AccountOut)
async def get_account(principal: JobsRead, session: SessionDep) -> AccountOut:
    """Balance in credits, and this key's limits with what is left of them."""
    account = await session.get(Account, principal.account_id)
    assert account is not None
    in_use = await session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.api_key_id == principal.key_id, Job.status.in_(ACTIVE))
    )
    return AccountOut(
        id=account.id,
        name=account.name,
        status=account.status,
        balance=await billing.balance(session, account.id),
        key_id=principal.key_id,
        limits=Limits(
            requests_per_minute=principal.rpm,
            concurrent_jobs=principal.concurrency,
            concurrent_jobs_in_use=int(in_use or 0),
        ),
    )


@router.get("/webhooks/default/secret", response_model=WebhookSecret, tags=["webhooks"])
async def default_secret(principal: WebhooksWrite, session: SessionDep) -> WebhookSecret:
    """The secret that signs deliveries to per-job `webhook_url`s (Standard Webhooks)."""
    account = await session.get(Account, principal.account_id)
    assert account is not None
    return WebhookSecret(key=account.webhook_secret)
