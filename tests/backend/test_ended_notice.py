"""A job's end is told on `job_service.ENDED` once committed; its other moves are not."""

from __future__ import annotations

from aigen.backend.job import service as job_service
from aigen.bus.messages import AIGenerationJobCompleted, AIGenerationJobFailed
from aigen.db import notices
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
