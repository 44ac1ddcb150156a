"""The worker's claim, given the event it came with: a message whose result the worker
announced already (the inbox recorded it) claims nothing, however it comes again."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from aigen.backend.billing import service as billing
from aigen.backend.job import service as job_service
from aigen.bus import inbox
from aigen.bus.messages import AIGenerationJobFailed, AIGenerationJobRequested, Envelope
from aigen.clock import utcnow
from aigen.db.group import GroupCommit
from aigen.db.session import unit_of_work
from aigen.models import InboxMessage, Job, OutboxMessage
from aigen.workflow import handlers as workflow
from tests.fixtures.asyncpg_calls import count_begins
from tests.fixtures.platform import Api


async def test_a_recorded_event_claims_nothing_and_another_does(api: Api) -> None:
    job_id, _ = await api.pending_job()
    async with unit_of_work(api.deps.sessionmaker) as session:
        first = await job_service.claim(session, job_id, unless_recorded=("workflow", "evt_1"))
        assert first is not None
        assert first.attempt == 1
        # The worker announces its result: the inbox records the event with it.
        assert await inbox.first_time(session, "workflow", "evt_1")
    async with unit_of_work(api.deps.sessionmaker) as session:
        again = await job_service.claim(session, job_id, unless_recorded=("workflow", "evt_1"))
        assert again is None
    async with api.deps.sessionmaker() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.attempt) == ("processing", 1)  # its result stays current
    async with unit_of_work(api.deps.sessionmaker) as session:
        # Another consumer's record of the same event does not stand in the way.
        other = await job_service.claim(session, job_id, unless_recorded=("backend", "evt_1"))
        assert other is not None
        assert other.attempt == 2


async def recorded(api: Api, consumer: str, event_id: str) -> bool:
    async with api.deps.sessionmaker() as session:
        row = await session.get(InboxMessage, (consumer, event_id))
        return row is not None


async def test_a_result_is_recorded_only_while_its_attempt_runs(api: Api) -> None:
    job_id, account_id = await api.pending_job()
    async with unit_of_work(api.deps.sessionmaker) as session:
        claimed = await job_service.claim(session, job_id)
        assert claimed is not None
    first = job_service.running_params(job_id, 1)
    async with unit_of_work(api.deps.sessionmaker) as session:
        # A stale attempt's result: nothing recorded, so nothing stands in the way later.
        stale = job_service.running_params(job_id, 2)
        assert not await inbox.first_time_if(session, "workflow", "e0", job_service.RUNNING, stale)
        assert await inbox.first_time_if(session, "workflow", "e1", job_service.RUNNING, first)
        assert not await inbox.first_time_if(session, "workflow", "e1", job_service.RUNNING, first)
    assert not await recorded(api, "workflow", "e0")
    assert await recorded(api, "workflow", "e1")
    async with unit_of_work(api.deps.sessionmaker) as session:
        await job_service.cancel(session, job_id, account_id=account_id)
    async with unit_of_work(api.deps.sessionmaker) as session:
        # The attempt ended (canceled): its result is not recorded.
        assert not await inbox.first_time_if(session, "workflow", "e2", job_service.RUNNING, first)
    assert not await recorded(api, "workflow", "e2")


def _count_statements(engine: AsyncEngine) -> list[str]:
    statements: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    return statements


async def _state(api: Api, job_id: str) -> tuple[str, int]:
    async with api.deps.sessionmaker() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        return job.status, job.attempt


async def test_claims_together_come_out_as_one_after_the_other(api: Api) -> None:
    fresh = [(await api.pending_job())[0] for _ in range(3)]
    announced, _ = await api.pending_job()
    overdue, _ = await api.pending_job()
    ended, account_id = await api.pending_job()
    async with unit_of_work(api.deps.sessionmaker) as session:
        # One job's result was announced with its message; one is past its deadline; one
        # was canceled before any worker came.
        assert await job_service.claim(session, announced, unless_recorded=("workflow", "e_a"))
        assert await inbox.first_time(session, "workflow", "e_a")
        await session.execute(
            update(Job).where(Job.id == overdue).values(deadline_at=utcnow() - timedelta(seconds=1))
        )
    async with unit_of_work(api.deps.sessionmaker) as session:
        await job_service.cancel(session, ended, account_id=account_id)
    claims = [
        (fresh[0], "e_0"),
        (announced, "e_a"),  # its message again: claims nothing
        (fresh[1], "e_1"),
        (overdue, "e_o"),
        (fresh[0], "e_0bis"),  # another message for a job claimed just before: claims again
        (ended, "e_e"),
        (fresh[2], "e_2"),
    ]
    async with unit_of_work(api.deps.sessionmaker) as session:
        jobs = await job_service.claim_many(session, claims, consumer="workflow")

    assert [(job.id, job.attempt) if job else None for job in jobs] == [
        (fresh[0], 2),  # the session's one object of the job, claimed again below
        None,
        (fresh[1], 1),
        None,
        (fresh[0], 2),
        None,
        (fresh[2], 1),
    ]
    assert await _state(api, fresh[0]) == ("processing", 2)
    assert await _state(api, fresh[2]) == ("processing", 1)
    assert await _state(api, announced) == ("processing", 1)  # its result stays current
    assert await _state(api, overdue) == ("expired", 0)
    assert await _state(api, ended) == ("canceled", 0)


async def test_claims_together_are_two_statements_however_many(api: Api) -> None:
    jobs = [(await api.pending_job())[0] for _ in range(5)]
    statements = _count_statements(api.deps.engine)
    async with unit_of_work(api.deps.sessionmaker) as session:
        claimed = await job_service.claim_many(
            session, [(job_id, f"e_{job_id}") for job_id in jobs], consumer="workflow"
        )
    assert [job.id if job else None for job in claimed] == jobs
    # The consumer's records among the events, and the multi-row claim.
    assert len([s for s in statements if not s.startswith(("BEGIN", "COMMIT"))]) == 2


async def test_results_together_are_recorded_only_while_their_attempts_run(api: Api) -> None:
    jobs = [(await api.pending_job())[0] for _ in range(4)]
    async with unit_of_work(api.deps.sessionmaker) as session:
        claimed = await job_service.claim_many(
            session, [(job_id, f"req_{job_id}") for job_id in jobs], consumer="workflow"
        )
    current, stale, canceled, again = [job for job in claimed if job is not None]
    async with unit_of_work(api.deps.sessionmaker) as session:
        # A newer attempt of one job started; another job was canceled; the third one's
        # result was announced already (its message comes again).
        assert await job_service.claim(session, stale.id) is not None
        await job_service.cancel(session, canceled.id, account_id=canceled.account_id)
        assert await inbox.first_time(session, "workflow", f"req_{again.id}")

    results = [_failed(job) for job in (current, stale, canceled, again)]
    async with unit_of_work(api.deps.sessionmaker) as session:
        announced = await workflow._announce_many(session, results)
    assert announced == [True, False, False, False]
    assert await _failures_announced(api) == [current.id]
    assert await recorded(api, "workflow", f"req_{current.id}")
    assert not await recorded(api, "workflow", f"req_{stale.id}")
    assert not await recorded(api, "workflow", f"req_{canceled.id}")


async def test_a_claim_alone_commits_by_itself_and_an_overdue_job_is_still_expired(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's claim of a job that comes alone (the common case below the maximum) is
    one statement: on PostgreSQL it commits by itself, with no BEGIN or COMMIT. A job
    found past its deadline is still expired and its hold released, in a transaction."""
    fresh, _ = await api.pending_job()
    overdue, account_id = await api.pending_job(credits=50, hold=6)
    async with unit_of_work(api.deps.sessionmaker) as session:
        await session.execute(
            update(Job).where(Job.id == overdue).values(deadline_at=utcnow() - timedelta(seconds=1))
        )
    begins = count_begins(monkeypatch)
    group = GroupCommit(api.deps.sessionmaker)

    claimed = await group.run_batched(workflow._claim_many, (fresh, "e_f"), order="1")
    after_claim = len(begins)
    expired = await group.run_batched(workflow._claim_many, (overdue, "e_o"), order="1")
    after_expiry = len(begins)

    assert claimed is not None
    assert (claimed.id, claimed.attempt) == (fresh, 1)
    assert expired is None
    assert await _state(api, fresh) == ("processing", 1)
    assert await _state(api, overdue) == ("expired", 0)
    async with api.deps.sessionmaker() as session:
        assert await billing.balance(session, account_id) == 50
    if api.deps.engine.dialect.name == "postgresql":
        assert (after_claim, after_expiry) == (0, 1)


async def test_an_announcement_alone_is_one_statement_and_a_stale_one_writes_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's announcement of a result that comes alone: the inbox row and the
    result event are one statement on PostgreSQL, which commits by itself (no BEGIN); a
    result whose attempt has ended writes neither."""
    jobs = [(await api.pending_job())[0] for _ in range(2)]
    async with unit_of_work(api.deps.sessionmaker) as session:
        current, stale = [
            job
            for job in await job_service.claim_many(
                session, [(job_id, f"req_{job_id}") for job_id in jobs], consumer="workflow"
            )
            if job is not None
        ]
    async with unit_of_work(api.deps.sessionmaker) as session:
        assert await job_service.claim(session, stale.id) is not None  # a newer attempt
    statements = _count_statements(api.deps.engine)
    begins = count_begins(monkeypatch)
    group = GroupCommit(api.deps.sessionmaker)

    announced = await group.run_batched(workflow._announce_many, _failed(current), order="2")
    sent = [s.split()[0] for s in statements]
    after_current = len(begins)
    discarded = await group.run_batched(workflow._announce_many, _failed(stale), order="2")

    assert (announced, discarded) == (True, False)
    assert await _failures_announced(api) == [current.id]
    assert await recorded(api, "workflow", f"req_{current.id}")
    assert not await recorded(api, "workflow", f"req_{stale.id}")
    if api.deps.engine.dialect.name == "postgresql":
        assert (sent, after_current) == (["WITH"], 0)


def _failed(job: Job) -> Any:
    """The worker's result of `job`'s attempt (a failure), as its message brought it."""
    event = AIGenerationJobFailed(
        job_id=job.id,
        account_id=job.account_id,
        attempt=job.attempt,
        error={"code": "test", "message": "scripted"},
    )
    requested = AIGenerationJobRequested(
        job_id=job.id, account_id=job.account_id, model=job.model, input=job.input
    )
    request = dataclasses.replace(Envelope.wrap(requested), id=f"req_{job.id}")
    return workflow._Result(request, job, event)


async def _failures_announced(api: Api) -> list[str]:
    """The jobs whose failure events the outbox holds."""
    async with api.deps.sessionmaker() as session:
        bodies = (await session.scalars(select(OutboxMessage.body))).all()
    events = [Envelope.from_json(body) for body in bodies]
    return [e.data["job_id"] for e in events if e.type == "AIGenerationJobFailed"]
