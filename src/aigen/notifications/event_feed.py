"""`GET /v1/events`: an account's job results in order, for catching up after an outage.

The feed reads the outbox, which keeps every event. Not every result event there became
the job's result: a worker's result for an attempt that was superseded, or that arrived
after a cancel, is refused by the backend. So each result is judged against the job:

- the job ended with this result (same status kind, same attempt): shown;
- the job ended otherwise, or moved on to a later attempt: skipped (it never happened);
- the job still runs this attempt: the backend has not applied it yet, so the page stops
  before it; a cursor never passes a result that may yet count. A result left unapplied
  for `UNAPPLIED_HORIZON` is taken as lost and skipped, so one stuck job cannot stall the
  feed for ever.

Ids are outbox row numbers. A PostgreSQL transaction can commit after one that took a
later number, so the feed shows only events older than `settings.events_feed_delay_seconds`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.bus.messages import CANCELED as CANCELED_EVENT
from aigen.bus.messages import COMPLETED as COMPLETED_EVENT
from aigen.bus.messages import FAILED as FAILED_EVENT
from aigen.clock import utcnow
from aigen.errors import Unprocessable
from aigen.models import Job, OutboxMessage
from aigen.models.job import CANCELED, COMPLETED, EXPIRED, FAILED, TERMINAL

from .schemas import Event
from .service import JOB_CANCELED, JOB_COMPLETED, JOB_FAILED

CURSOR_PREFIX = "evt_"
UNAPPLIED_HORIZON = timedelta(minutes=15)
RESULT_TYPES = {
    COMPLETED_EVENT: JOB_COMPLETED,
    FAILED_EVENT: JOB_FAILED,
    CANCELED_EVENT: JOB_CANCELED,
}
# The job statuses each result event can end in.
ENDS_IN = {
    COMPLETED_EVENT: {COMPLETED},
    FAILED_EVENT: {FAILED, EXPIRED},
    CANCELED_EVENT: {CANCELED},
}


class InvalidCursorError(Unprocessable):
    code = "invalid_cursor"
    title = "The cursor is not valid"


class _Verdict(Enum):
    SHOW = "show"
    SKIP = "skip"
    WAIT = "wait"


@dataclass(frozen=True, slots=True)
class Page:
    events: list[Event]
    has_more: bool
    next_cursor: str | None


def parse_cursor(cursor: str | None) -> int:
    """The outbox id an `evt_…` cursor names (0: from the start)."""
    if not cursor:
        return 0
    number = cursor.removeprefix(CURSOR_PREFIX)
    if not number.isdigit():
        raise InvalidCursorError(f"{cursor!r} is not an event id (`evt_…`)")
    return int(number)


async def read(
    session: AsyncSession,
    account_id: str,
    *,
    after: str | None,
    limit: int,
    delay: float,
) -> Page:
    """Up to `limit` events after the cursor, oldest first."""
    position = parse_cursor(after)
    now = utcnow()
    visible_before = now - timedelta(seconds=delay)
    events: list[Event] = []
    # Skipped results make short batches: read on until the page is full, within reason.
    for _ in range(10):
        batch = limit - len(events) + 1  # one more than needed tells whether there is more
        rows = (
            await session.scalars(
                select(OutboxMessage)
                .where(
                    OutboxMessage.account_id == account_id,
                    OutboxMessage.id > position,
                    OutboxMessage.type.in_(list(RESULT_TYPES)),
                    OutboxMessage.created_at <= visible_before,
                )
                .order_by(OutboxMessage.id)
                .limit(batch)
            )
        ).all()
        jobs = await _jobs(session, [str(_data(row)["job_id"]) for row in rows])
        for row in rows:
            if len(events) == limit:
                return Page(events, True, _cursor(position))
            data = _data(row)
            verdict = _judge(row, data, jobs.get(str(data["job_id"])), now)
            if verdict is _Verdict.WAIT:
                return Page(events, False, _cursor(position))
            position = row.id
            if verdict is _Verdict.SHOW:
                events.append(_event(row, data))
        if len(rows) < batch:
            return Page(events, False, _cursor(position))
    return Page(events, True, _cursor(position))


def _judge(row: OutboxMessage, data: dict[str, Any], job: Job | None, now: datetime) -> _Verdict:
    if job is None:
        return _Verdict.SKIP
    if row.type == CANCELED_EVENT or data.get("status") == EXPIRED:
        # Written by the backend in the transaction that made the change: always true.
        return _Verdict.SHOW if job.status in ENDS_IN[row.type] else _Verdict.SKIP
    attempt = int(data.get("attempt", 0))
    if job.status in TERMINAL:
        ended_here = job.status in ENDS_IN[row.type] and job.attempt == attempt
        return _Verdict.SHOW if ended_here else _Verdict.SKIP
    if attempt < job.attempt or now - row.created_at > UNAPPLIED_HORIZON:
        return _Verdict.SKIP
    return _Verdict.WAIT


def _event(row: OutboxMessage, data: dict[str, Any]) -> Event:
    status = data.get("status") or "canceled"
    shown: dict[str, Any] = {"job_id": data["job_id"], "status": status}
    if row.type == COMPLETED_EVENT:
        shown["usage"] = data.get("usage")
    elif row.type == FAILED_EVENT:
        shown["error"] = data.get("error")
    return Event(
        id=_cursor(row.id) or "",
        type=RESULT_TYPES[row.type],
        created_at=row.created_at,
        data=shown,
    )


async def _jobs(session: AsyncSession, job_ids: Sequence[str]) -> dict[str, Job]:
    if not job_ids:
        return {}
    rows = await session.scalars(select(Job).where(Job.id.in_(set(job_ids))))
    return {job.id: job for job in rows}


def _data(row: OutboxMessage) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(row.body)["data"]
    return data


def _cursor(position: int) -> str | None:
    return f"{CURSOR_PREFIX}{position}" if position else None
