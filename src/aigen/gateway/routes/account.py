"""`GET /v1/account` (balance, limits and what is left of them), `GET /v1/usage`, and the
account's default webhook secret."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlalchemy import func, select

from aigen.backend.billing import service as billing
from aigen.backend.billing import usage as usage_service
from aigen.backend.billing.schemas import Usage
from aigen.clock import utcnow
from aigen.errors import Unprocessable
from aigen.gateway.auth import JobsRead, WebhooksWrite
from aigen.gateway.deps import SessionDep
from aigen.limits import Decision
from aigen.models import Account, Job
from aigen.models.job import ACTIVE

router = APIRouter(prefix="/v1", tags=["account"])


class Limits(BaseModel):
    """This key's limits; a quota that is `null` is not set."""

    requests_per_minute: int
    concurrent_jobs: int
    concurrent_jobs_in_use: int
    jobs_per_day: int | None = None
    jobs_per_month: int | None = None
    credits_per_day: int | None = None
    credits_per_month: int | None = None


class PolicyLeft(BaseModel):
    """What is left of one policy, as the `RateLimit` header names it."""

    limit: int
    remaining: int
    reset_seconds: int | None = None
    window_seconds: int | None = None
    unit: Literal["requests", "jobs", "credits"]


class AccountOut(BaseModel):
    id: str
    object: Literal["account"] = "account"
    name: str
    status: str
    balance: int
    key_id: str
    limits: Limits
    remaining: dict[str, PolicyLeft]


class WebhookSecret(BaseModel):
    key: str


def _left(decision: Decision | None, in_use: int, concurrency: int) -> dict[str, PolicyLeft]:
    left: dict[str, PolicyLeft] = {}
    for policy in decision.policies if decision else ():
        unit: Literal["requests", "jobs", "credits"] = (
            "requests" if policy.name == "rpm" else "credits" if policy.unit else "jobs"
        )
        left[policy.name] = PolicyLeft(
            limit=policy.limit,
            remaining=policy.remaining,
            reset_seconds=None if policy.reset_seconds is None else math.ceil(policy.reset_seconds),
            window_seconds=policy.window_seconds,
            unit=unit,
        )
    left["concurrency"] = PolicyLeft(
        limit=concurrency, remaining=max(0, concurrency - in_use), unit="jobs"
    )
    return left


@router.get("/account", response_model=AccountOut)
async def get_account(principal: JobsRead, session: SessionDep, request: Request) -> AccountOut:
    """Balance in credits, this key's limits, and what is left of each (this request
    included): requests this minute, concurrent jobs, jobs and credits today and this
    month. Credit quotas count a running job's worst case until it ends."""
    account = await session.get(Account, principal.account_id)
    assert account is not None
    in_use = int(
        await session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.api_key_id == principal.key_id, Job.status.in_(ACTIVE))
        )
        or 0
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
            concurrent_jobs_in_use=in_use,
            jobs_per_day=principal.jobs_per_day,
            jobs_per_month=principal.jobs_per_month,
            credits_per_day=principal.credits_per_day,
            credits_per_month=principal.credits_per_month,
        ),
        remaining=_left(getattr(request.state, "limits", None), in_use, principal.concurrency),
    )


@router.get("/usage", response_model=Usage, responses={422: Unprocessable.schema()})
async def get_usage(
    principal: JobsRead,
    session: SessionDep,
    start: Annotated[
        datetime | None,
        Query(
            alias="from",
            description="ISO 8601 date or time, UTC if no zone; inclusive. "
            "Default: the start of this month.",
        ),
    ] = None,
    end: Annotated[
        datetime | None,
        Query(alias="to", description="exclusive; default: now"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="ledger entries per page")] = 100,
    cursor: Annotated[int | None, Query(description="`next_cursor` of the previous page")] = None,
) -> Usage:
    """Jobs and credits charged by model and by UTC day, and the ledger entries (`grant`,
    `hold`, `capture`, `release`, `adjust`) of the period `[from, to)`."""
    try:
        period_start, period_end = usage_service.period(start, end, now=utcnow())
    except ValueError as error:
        raise Unprocessable(str(error)) from None
    return await usage_service.report(
        session,
        principal.account_id,
        start=period_start,
        end=period_end,
        limit=limit,
        before=cursor,
    )


@router.get("/webhooks/default/secret", response_model=WebhookSecret, tags=["webhooks"])
async def default_secret(principal: WebhooksWrite, session: SessionDep) -> WebhookSecret:
    """The secret that signs deliveries to per-job `webhook_url`s (Standard Webhooks)."""
    account = await session.get(Account, principal.account_id)
    assert account is not None
    return WebhookSecret(key=account.webhook_secret)
