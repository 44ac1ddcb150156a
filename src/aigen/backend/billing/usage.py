"""Usage from the ledger: each accepted job has one `hold` entry and, if it was charged,
one `capture` entry, so counting the first and summing the second per model and per UTC
day gives jobs and credits without reading the jobs table."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.db.session import is_postgres
from aigen.models import CreditEntry, Job
from aigen.models.job import TERMINAL

from .schemas import DayUsage, LedgerEntry, ModelUsage, Usage, UsageTotals


def period(
    start: datetime | None, end: datetime | None, *, now: datetime
) -> tuple[datetime, datetime]:
    """`[start, end)` in UTC: naive times are UTC; by default this calendar month so far.

    Raises `ValueError` when `start` is not before `end`.
    """
    end = _utc(end) if end is not None else now
    start = (
        _utc(start)
        if start is not None
        else now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    )
    if start >= end:
        raise ValueError("`from` must be before `to`")
    return start, end


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _utc_day(session: AsyncSession) -> ColumnElement[str]:
    if is_postgres(session):
        return func.to_char(func.timezone("UTC", CreditEntry.created_at), "YYYY-MM-DD")
    # SQLite keeps UTC timestamps as text (`aigen.db.base.UTCDateTime`).
    return func.strftime("%Y-%m-%d", CreditEntry.created_at)


async def report(
    session: AsyncSession,
    account_id: str,
    *,
    start: datetime,
    end: datetime,
    limit: int = 100,
    before: int | None = None,
) -> Usage:
    """Usage in `[start, end)`; `entries` newest first, `before` the previous page's cursor."""
    in_period = (
        CreditEntry.account_id == account_id,
        CreditEntry.created_at >= start,
        CreditEntry.created_at < end,
    )
    day = _utc_day(session).label("day")
    jobs = func.sum(case((CreditEntry.kind == "hold", 1), else_=0))
    charged = func.sum(case((CreditEntry.kind == "capture", -CreditEntry.amount), else_=0))
    grouped = await session.execute(
        select(CreditEntry.model, day, jobs, charged)
        .where(*in_period, CreditEntry.kind.in_(("hold", "capture")))
        .group_by(CreditEntry.model, day)
    )
    by_model: dict[str, UsageTotals] = {}
    by_day: dict[str, UsageTotals] = {}
    totals = UsageTotals()
    for model, date, job_count, credits in grouped.all():
        for bucket in (
            by_model.setdefault(model or "", UsageTotals()),
            by_day.setdefault(date, UsageTotals()),
            totals,
        ):
            bucket.jobs += int(job_count or 0)
            bucket.credits_charged += int(credits or 0)

    statement = select(CreditEntry).where(*in_period)
    if before is not None:
        statement = statement.where(CreditEntry.id < before)
    rows = list(
        (await session.scalars(statement.order_by(CreditEntry.id.desc()).limit(limit + 1))).all()
    )
    page = rows[:limit]
    more = len(rows) > limit
    return Usage(
        account_id=account_id,
        period_from=start,
        period_to=end,
        totals=totals,
        by_model=[ModelUsage(model=m, **t.model_dump()) for m, t in sorted(by_model.items())],
        by_day=[DayUsage(date=d, **t.model_dump()) for d, t in sorted(by_day.items())],
        entries=[LedgerEntry.model_validate(row) for row in page],
        has_more=more,
        next_cursor=page[-1].id if more and page else None,
    )


async def key_spend(session: AsyncSession, key_id: str, *, since: datetime) -> tuple[int, int]:
    """(jobs, credits) a key's jobs accepted since `since` count against its quotas.

    Counted as the limiter counts them: a job still running at its hold, an ended one at
    what it was charged.
    """
    credits = case(
        (Job.status.in_(sorted(TERMINAL)), func.coalesce(Job.credits_charged, 0)),
        else_=Job.credits_reserved,
    )
    row = (
        await session.execute(
            select(func.count(), func.coalesce(func.sum(credits), 0)).where(
                Job.api_key_id == key_id, Job.created_at >= since
            )
        )
    ).one()
    return int(row[0] or 0), int(row[1] or 0)
