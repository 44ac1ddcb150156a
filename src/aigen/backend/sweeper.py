"""Housekeeping the backend runs on a timer, in whichever backend process gets there first.

- A pending job whose deadline passes while no worker claims it (all busy, or none
  running) is expired and refunded in full here; a worker's claim does the same for the
  jobs it reaches first. Both are compare-and-sets, so a job expires at most once.
- A job processing with no sign of life (claim, progress) for longer than any run can
  take (`Settings.resolved_lost_after`) lost both its worker and its message: a crash
  that the broker stopped redelivering, or a message dead-lettered where no hook saw it.
  It fails, refunded in full, and the failure is announced (webhook, events feed); a
  result that still arrives later is stale and changes nothing.
- Idempotency keys past their 24 h are deleted.
- Consumers' inbox rows of events older than a week are deleted (`bus.inbox`): three a
  job, which a long-running deployment would otherwise keep for ever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.aio import sleep_or_stop
from aigen.bus import inbox
from aigen.clock import utcnow
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import Job
from aigen.models.job import PENDING, PROCESSING

from .idempotency import service as idempotency_service
from .job import service as job_service

log = structlog.get_logger(__name__)

BATCH = 100
PURGE_EVERY_SECONDS = 300.0
# A redelivered event comes within minutes of its first delivery (`bus.inbox`): a week
# is room to spare for an outage of the broker or of a consumer.
INBOX_RETENTION = timedelta(days=7)
# Inbox rows deleted per consumer and statement: a short transaction, however far
# behind the sweep is. A sweep that deletes a full batch sweeps again at its next turn.
INBOX_BATCH = 1000


async def expire_overdue(sessionmaker: Sessionmaker, *, batch: int = BATCH) -> int:
    """Expire (and refund) pending jobs past their deadline; returns how many."""

    async def expire(session: AsyncSession, job: Job) -> bool:
        return await job_service.expire(session, job) is not None

    overdue = await _oldest(
        sessionmaker,
        Job.deadline_at,
        Job.status == PENDING,
        Job.deadline_at <= utcnow(),
        batch=batch,
    )
    expired = await _each_alone(sessionmaker, overdue, expire)
    if expired:
        log.info("sweeper.expired", jobs=expired)
    return expired


async def fail_lost(sessionmaker: Sessionmaker, *, older_than: float, batch: int = BATCH) -> int:
    """Fail (and refund) processing jobs untouched for `older_than` seconds; how many."""
    cutoff = utcnow() - timedelta(seconds=older_than)

    async def fail(session: AsyncSession, job: Job) -> bool:
        # Checked again in this transaction: a worker may have just come back to it.
        if job.status != PROCESSING or job.updated_at >= cutoff:
            return False
        if await job_service.fail_lost(session, job) is None:
            return False
        log.warning("sweeper.lost", job_id=job.id, attempt=job.attempt)
        return True

    lost = await _oldest(
        sessionmaker, Job.updated_at, Job.status == PROCESSING, Job.updated_at < cutoff, batch=batch
    )
    return await _each_alone(sessionmaker, lost, fail)


async def _oldest(
    sessionmaker: Sessionmaker, by: Any, *conditions: Any, batch: int
) -> Sequence[str]:
    """The ids of at most `batch` jobs that meet `conditions`, the oldest `by` first."""
    async with sessionmaker() as session:
        statement = select(Job.id).where(*conditions).order_by(by).limit(batch)
        return (await session.scalars(statement)).all()


async def _each_alone(
    sessionmaker: Sessionmaker,
    job_ids: Sequence[str],
    act: Callable[[AsyncSession, Job], Awaitable[bool]],
) -> int:
    """`act` on each job in a transaction of its own; returns how many it acted on.

    One transaction per job: a long batch would hold the ledger rows of many accounts.
    """
    done = 0
    for job_id in job_ids:
        async with unit_of_work(sessionmaker) as session:
            job = await session.get(Job, job_id)
            if job is not None and await act(session, job):
                done += 1
    return done


async def purge_idempotency_keys(sessionmaker: Sessionmaker) -> int:
    async with unit_of_work(sessionmaker) as session:
        return await idempotency_service.purge_expired(session)


async def purge_inbox(
    sessionmaker: Sessionmaker,
    *,
    older_than: timedelta = INBOX_RETENTION,
    batch: int = INBOX_BATCH,
) -> int:
    """Delete up to `batch` inbox rows per consumer of events older than `older_than`,
    each consumer's in a transaction of its own; returns the most rows deleted for one
    consumer, so that `batch` means more may be left."""
    before = utcnow() - older_than
    async with sessionmaker() as session:
        names = await inbox.consumers(session)
    most = 0
    for name in names:
        async with unit_of_work(sessionmaker) as session:
            purged = await inbox.purge(session, name, before=before, limit=batch)
        if purged:
            log.info("sweeper.inbox_purged", consumer=name, rows=purged)
        most = max(most, purged)
    return most


async def run(
    sessionmaker: Sessionmaker,
    stop: asyncio.Event,
    *,
    interval: float,
    lost_after: float,
) -> None:
    """Sweep every `interval` seconds until `stop`; an error is logged and retried."""
    purged_at = inbox_purged_at = 0.0
    while not stop.is_set():
        try:
            while await expire_overdue(sessionmaker) == BATCH and not stop.is_set():
                pass
            while (
                await fail_lost(sessionmaker, older_than=lost_after) == BATCH and not stop.is_set()
            ):
                pass
            if time.monotonic() - purged_at >= PURGE_EVERY_SECONDS:
                await purge_idempotency_keys(sessionmaker)
                purged_at = time.monotonic()
            if time.monotonic() - inbox_purged_at >= PURGE_EVERY_SECONDS:
                # More than a batch to delete (five minutes of a busy deployment, or a
                # backlog) goes a batch a turn, between the jobs' own sweeps.
                behind = await purge_inbox(sessionmaker, batch=INBOX_BATCH) >= INBOX_BATCH
                inbox_purged_at = 0.0 if behind else time.monotonic()
        except Exception:
            log.exception("sweeper.failed")
        await sleep_or_stop(stop, interval)
