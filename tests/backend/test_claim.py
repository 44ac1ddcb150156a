"""The worker's claim, given the event it came with: a message whose result the worker
announced already (the inbox recorded it) claims nothing, however it comes again."""

from __future__ import annotations

from aigen.backend.job import service as job_service
from aigen.bus import inbox
from aigen.db.session import unit_of_work
from aigen.models import Job
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
