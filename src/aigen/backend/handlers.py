"""The backend's event consumer (seed steps 11–12): results become job state and money.

Each event is applied in one transaction with the consumer's inbox row, so an event
applied once is skipped when redelivered, and a crash before the commit applies nothing.
The events that arrive together share that transaction (`aigen.db.group`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.bus import inbox
from aigen.bus.broker import DeadLetterHook, Handler
from aigen.bus.messages import (
    COMPLETED,
    REQUESTED,
    AIGenerationJobCanceled,
    AIGenerationJobCompleted,
    AIGenerationJobFailed,
    AIGenerationJobRequested,
    Envelope,
)
from aigen.db.group import GroupCommit
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.limits import Limiter
from aigen.models import Job
from aigen.models.job import TERMINAL
from aigen.serving.base import Usage

from .job import service as job_service

CONSUMER = "backend"
log = structlog.get_logger(__name__)

# model name, usage → credits; the catalog's price table, or a fallback for removed models.
Pricer = Callable[[str, Usage], int]


def make_handler(
    sessionmaker: Sessionmaker, pricer: Pricer, *, limiter: Limiter | None = None
) -> Handler:
    """With `limiter`, a job that has ended gives the unspent part of its hold back to the
    key's credit quotas, after the commit (the limiter makes that happen once per job).

    The results that arrive together are applied in one transaction (`GroupCommit`).
    """
    group = GroupCommit(sessionmaker)

    async def apply_completed(
        session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> list[tuple[str, Job | None]]:
        return await _apply_completed(session, envelopes, pricer)

    async def handle(envelope: Envelope) -> None:
        # A settlement updates its account's balance: accounts in id order, as the API's
        # intake locks them.
        order = str(envelope.data.get("account_id", ""))
        if envelope.type == COMPLETED:
            # The most common result: those of a transaction share their statements.
            outcome, ended = await group.run_batched(apply_completed, envelope, order=order)
        else:
            outcome, ended = await group.run(
                lambda session: _apply(session, envelope, pricer), order=order
            )
        if limiter is not None and ended is not None:
            unspent = ended.credits_reserved - (ended.credits_charged or 0)
            await limiter.refund(ended.api_key_id, ended.id, credits=unspent)
        log.info(
            "backend.applied", event_type=envelope.type, job_id=envelope.job_id, outcome=outcome
        )

    return handle


async def _apply(
    session: AsyncSession, envelope: Envelope, pricer: Pricer
) -> tuple[str, Job | None]:
    """Apply one event in the caller's transaction: its outcome, and the job if it ended."""
    message = envelope.message()
    if not await inbox.first_time(session, CONSUMER, envelope.id):
        return "duplicate", None
    if isinstance(message, AIGenerationJobCompleted):
        usage = Usage(**message.usage)
        job = await job_service.apply_completed(
            session, message, price=lambda job: pricer(job.model, usage)
        )
        outcome = "completed" if job else "stale"
    elif isinstance(message, AIGenerationJobFailed):
        job = await job_service.apply_failed(session, message)
        outcome = "failed" if job else "stale"
    elif isinstance(message, AIGenerationJobCanceled):
        # The API applied the cancel and refund in its own transaction.
        return "canceled", await _ended(session, envelope.job_id)
    else:
        assert isinstance(message, AIGenerationJobRequested)
        return "ignored", None
    return outcome, await _ended(session, envelope.job_id)


async def _apply_completed(
    session: AsyncSession, envelopes: Sequence[Envelope], pricer: Pricer
) -> list[tuple[str, Job | None]]:
    """`_apply` of several completed results, with the statements of all of them shared
    (`job_service.apply_completed_many`)."""
    if len(envelopes) == 1:
        return [await _apply_one_completed(session, envelopes[0], pricer)]
    fresh = await inbox.first_time_many(session, CONSUMER, [e.id for e in envelopes])
    firsts: list[Envelope] = []  # recorded now: each event once, however often it came
    for envelope in envelopes:
        if envelope.id in fresh:
            fresh.discard(envelope.id)
            firsts.append(envelope)
    jobs = await job_service.apply_completed_many(
        session,
        [_completed(envelope) for envelope in firsts],
        price=lambda job, message: pricer(job.model, Usage(**message.usage)),
    )
    applied = {envelope.id: job for envelope, job in zip(firsts, jobs, strict=True)}
    outcomes: list[tuple[str, Job | None]] = []
    for envelope in envelopes:
        if envelope.id not in applied:
            outcomes.append(("duplicate", None))
            continue
        outcome = "completed" if applied.pop(envelope.id) else "stale"
        outcomes.append((outcome, await _ended(session, envelope.job_id)))
    return outcomes


async def _apply_one_completed(
    session: AsyncSession, envelope: Envelope, pricer: Pricer
) -> tuple[str, Job | None]:
    """`_apply` of one completed result: applied first, its inbox row written with it
    (`job_service.apply_completed_recording`: on PostgreSQL a read and one statement,
    which commit by themselves when the result comes alone); a result recorded before
    cannot apply, since it left its job no longer processing at its attempt."""
    message = _completed(envelope)
    usage = Usage(**message.usage)
    job = await job_service.apply_completed_recording(
        session,
        message,
        price=lambda job: pricer(job.model, usage),
        record=inbox.recording(CONSUMER, envelope.id),
    )
    if job is not None:
        return "completed", job
    if await inbox.recorded(session, CONSUMER, [envelope.id]):
        return "duplicate", None
    return "stale", await _ended(session, envelope.job_id)


def _completed(envelope: Envelope) -> AIGenerationJobCompleted:
    message = envelope.message()
    assert isinstance(message, AIGenerationJobCompleted)
    return message


async def _ended(session: AsyncSession, job_id: str | None) -> Job | None:
    current = await session.get(Job, job_id) if job_id else None
    return current if current is not None and current.status in TERMINAL else None


def make_dead_letter_hook(sessionmaker: Sessionmaker) -> DeadLetterHook:
    """A requested job whose message was dead-lettered fails and is refunded, not lost."""

    async def on_dead_letter(envelope: Envelope, error: str) -> None:
        # Only the job id is read: a message dead-lettered because its data could not be
        # parsed must still fail its job rather than leave it pending with its hold.
        job_id = envelope.data.get("job_id")
        if envelope.type != REQUESTED or not isinstance(job_id, str):
            return
        async with unit_of_work(sessionmaker) as session:
            job = await session.get(Job, job_id)
            if job is None:
                return
            failure = {
                "code": "internal_error",
                "message": "the job could not be processed",
                "retryable": False,
            }
            await job_service.fail(session, job, failure)

    return on_dead_letter
