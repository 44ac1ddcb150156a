"""The worker's claim, given the event it came with: a message whose result the worker
announced already (the inbox recorded it) claims nothing, however it comes again."""

from __future__ import annotations

from aigen.backend.job import service as job_service
from aigen.bus import inbox
from aigen.db.session import unit_of_work
from aigen.models import InboxMessage, Job
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
