"""A job's end is told on `job_service.ENDED` once committed; its other moves are not."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.backend import handlers
from aigen.backend.job import service as job_service
from aigen.bus.messages import AIGenerationJobCompleted, AIGenerationJobFailed, Envelope
from aigen.db import notices
from aigen.db.group import GroupCommit
from aigen.db.session import unit_of_work
from tests.fixtures.platform import Api


async def test_a_completed_job_is_told_and_a_claim_is_not(api: Api) -> None:
    listener = notices.Listener(job_service.ENDED, api.deps.sessionmaker)
    job_id, account_id = await api.pending_job()
    with listener.watch(job_id) as watch:
        async with unit_of_work(api.deps.sessionmaker) as session:
            assert await job_service.claim(session, job_id) is not None
        assert not await watch.wait(0.1)
        async with unit_of_work(api.deps.sessionmaker) as session:
            done = await job_service.apply_completed(
                session,
                AIGenerationJobCompleted(
                    job_id=job_id, account_id=account_id, attempt=1, assets=[], usage={}
                ),
                price=1,
            )
            assert done is not None
            assert not await watch.wait(0)  # not before the commit
        assert await watch.wait(5)


async def test_a_stale_result_tells_nothing(api: Api) -> None:
    listener = notices.Listener(job_service.ENDED, api.deps.sessionmaker)
    job_id, account_id = await api.pending_job()
    async with unit_of_work(api.deps.sessionmaker) as session:
        assert await job_service.claim(session, job_id) is not None
    with listener.watch(job_id) as watch:
        async with unit_of_work(api.deps.sessionmaker) as session:
            stale = AIGenerationJobFailed(
                job_id=job_id,
                account_id=account_id,
                attempt=7,
                error={"code": "x", "message": "x", "retryable": False},
            )
            assert await job_service.apply_failed(session, stale) is None
        assert not await watch.wait(0.1)


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_result_alone_tells_the_end_in_its_own_statement(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend's settlement of a result that comes alone is one statement that commits
    by itself; the job's end goes to other processes with it (one NOTIFY, no `pg_notify`
    sent after the commit) and to this process's listeners, and a redelivered result
    tells nothing more."""
    dsn = notices.listen_dsn(api.deps.sessionmaker)
    assert dsn is not None
    other = await asyncpg.connect(dsn)  # another process's listener
    heard: list[str] = []
    await other.add_listener(job_service.ENDED, lambda *args: heard.append(args[3]))
    sent_after: list[str] = []
    execute = asyncpg.Connection.execute

    async def watched(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if "pg_notify" in query and args[0] == job_service.ENDED:
            sent_after.append(args[1])
        return await execute(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "execute", watched)
    listener = notices.Listener(job_service.ENDED, api.deps.sessionmaker)
    job_id, account_id = await api.pending_job()
    async with unit_of_work(api.deps.sessionmaker) as session:
        assert await job_service.claim(session, job_id) is not None
    result = Envelope.wrap(
        AIGenerationJobCompleted(
            job_id=job_id, account_id=account_id, attempt=1, assets=[], usage={}
        )
    )
    group = GroupCommit(api.deps.sessionmaker)

    def apply(session: AsyncSession, alone: Sequence[Envelope]) -> Any:
        return handlers._apply_completed(session, alone, lambda model, usage: 1)

    try:
        with listener.watch(job_id) as watch:
            outcome, _ = await group.run_batched(apply, result)
            assert outcome == "completed"
            assert await watch.wait(0)
        async with asyncio.timeout(5):
            while not heard:
                await asyncio.sleep(0.01)
        again, _ = await group.run_batched(apply, result)
        await asyncio.sleep(0.2)
    finally:
        await other.close()

    assert again == "duplicate"
    assert heard == [job_id]
    assert sent_after == []
