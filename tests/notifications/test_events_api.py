"""`GET /v1/events`: the account's job results from the outbox, in order, with a cursor."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from aigen.bus import outbox
from aigen.bus.messages import (
    AIGenerationJobCanceled,
    AIGenerationJobCompleted,
    AIGenerationJobFailed,
    AIGenerationJobRequested,
    Message,
)
from aigen.clock import utcnow
from aigen.config import Settings
from aigen.db.session import unit_of_work
from aigen.models import Account, OutboxMessage
from aigen.models.job import Job
from aigen.notifications import event_feed
from tests.conftest import make_settings
from tests.fixtures.platform import Api, Customer
from tests.gateway.test_errors import assert_problem

from .factories import create_job

USAGE = {"input_tokens": 2, "output_tokens": 4, "images": 0}
ERROR = {"code": "content_rejected", "message": "no", "retryable": False}


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    # Events show at once here; the delay has a test of its own.
    return make_settings(tmp_path, database_url=database_url, events_feed_delay_seconds=0)


async def job_with(
    api: Api, customer: Customer, status: str, *events: Message, attempt: int = 1
) -> str:
    """A job in `status` at `attempt`, and outbox rows for `events` (their ids filled in)."""
    async with unit_of_work(api.deps.sessionmaker) as session:
        account = await session.get(Account, customer.account_id)
        assert account is not None
        job = await create_job(session, account, status=status)
        job.attempt = attempt
        for event in events:
            outbox.add(session, replace(event, job_id=job.id, account_id=job.account_id))
    return job.id


def completed(attempt: int = 1) -> AIGenerationJobCompleted:
    return AIGenerationJobCompleted("", "", attempt=attempt, assets=[], usage=USAGE)


def failed(attempt: int = 1, status: str = "failed") -> AIGenerationJobFailed:
    return AIGenerationJobFailed("", "", attempt=attempt, error=ERROR, status=status)


async def feed(api: Api, customer: Customer, **params: Any) -> dict[str, Any]:
    async with api.client(customer) as client:
        answer = await client.get("/v1/events", params=params)
    assert answer.status_code == 200, answer.text
    page: dict[str, Any] = answer.json()
    return page


class TestEvents:
    async def test_anonymous(self, api: Api) -> None:
        async with api.client() as client:
            assert_problem(await client.get("/v1/events"), 401)

    async def test_every_kind_of_result_in_order(self, api: Api) -> None:
        customer = await api.customer()
        requested = AIGenerationJobRequested("", "", model="m", input={})
        done = await job_with(api, customer, "completed", requested, completed())
        broken = await job_with(api, customer, "failed", failed())
        late = await job_with(api, customer, "expired", failed(0, "expired"), attempt=0)
        stopped = await job_with(api, customer, "canceled", AIGenerationJobCanceled("", ""))
        page = await feed(api, customer)
        assert [(e["type"], e["data"]) for e in page["data"]] == [
            (
                "ai_generation.job.completed",
                {"job_id": done, "status": "completed", "usage": USAGE},
            ),
            ("ai_generation.job.failed", {"job_id": broken, "status": "failed", "error": ERROR}),
            ("ai_generation.job.failed", {"job_id": late, "status": "expired", "error": ERROR}),
            ("ai_generation.job.canceled", {"job_id": stopped, "status": "canceled"}),
        ]
        assert all(e["id"].startswith("evt_") and e["object"] == "event" for e in page["data"])
        assert page["has_more"] is False
        assert page["next_cursor"] == page["data"][-1]["id"]

    async def test_cursor(self, api: Api) -> None:
        customer = await api.customer()
        jobs = [await job_with(api, customer, "completed", completed()) for _ in range(5)]
        first = await feed(api, customer, limit=2)
        second = await feed(api, customer, limit=2, after=first["next_cursor"])
        third = await feed(api, customer, limit=2, after=second["next_cursor"])
        assert [e["data"]["job_id"] for e in first["data"] + second["data"]] == jobs[:4]
        assert [e["data"]["job_id"] for e in third["data"]] == jobs[4:]
        assert [p["has_more"] for p in (first, second, third)] == [True, True, False]
        # Caught up: the same cursor comes back until something new happens.
        idle = await feed(api, customer, after=third["next_cursor"])
        assert (idle["data"], idle["next_cursor"]) == ([], third["next_cursor"])
        newer = await job_with(api, customer, "completed", completed())
        fresh = await feed(api, customer, after=idle["next_cursor"])
        assert [e["data"]["job_id"] for e in fresh["data"]] == [newer]
        # Any event's id works as a cursor too.
        resumed = await feed(api, customer, after=first["data"][0]["id"], limit=1)
        assert [e["data"]["job_id"] for e in resumed["data"]] == [jobs[1]]

    async def test_results_that_never_happened_are_left_out(self, api: Api) -> None:
        customer = await api.customer()
        # Canceled while it ran; the worker's result came after and was refused.
        canceled = await job_with(
            api, customer, "canceled", AIGenerationJobCanceled("", ""), completed()
        )
        # A dead worker's result for attempt 1 after attempt 2 had finished.
        retried = await job_with(api, customer, "completed", completed(2), failed(1), attempt=2)
        # Attempt 1's late result while attempt 2 still runs.
        running = await job_with(api, customer, "processing", completed(1), attempt=2)
        page = await feed(api, customer, limit=10)
        assert [(e["type"], e["data"]["job_id"]) for e in page["data"]] == [
            ("ai_generation.job.canceled", canceled),
            ("ai_generation.job.completed", retried),
        ]
        assert page["has_more"] is False
        assert running not in {e["data"]["job_id"] for e in page["data"]}

    async def test_waits_for_a_result_not_yet_applied(self, api: Api) -> None:
        customer = await api.customer()
        before = await job_with(api, customer, "completed", completed())
        pending = await job_with(api, customer, "processing", completed())
        after = await job_with(api, customer, "completed", completed())
        page = await feed(api, customer)
        assert [e["data"]["job_id"] for e in page["data"]] == [before]
        assert page["has_more"] is False
        # The backend applies the result: the feed goes on from where it stopped.
        async with unit_of_work(api.deps.sessionmaker) as session:
            await session.execute(update(Job).where(Job.id == pending).values(status="completed"))
        rest = await feed(api, customer, after=page["next_cursor"])
        assert [e["data"]["job_id"] for e in rest["data"]] == [pending, after]

    async def test_a_result_never_applied_stops_the_feed_for_a_while_only(self, api: Api) -> None:
        customer = await api.customer()
        stuck = await job_with(api, customer, "processing", completed())
        after = await job_with(api, customer, "completed", completed())
        assert (await feed(api, customer))["data"] == []
        async with unit_of_work(api.deps.sessionmaker) as session:
            long_ago = utcnow() - event_feed.UNAPPLIED_HORIZON - timedelta(seconds=1)
            await session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.body.contains(stuck))
                .values(created_at=long_ago)
            )
        page = await feed(api, customer)
        assert [e["data"]["job_id"] for e in page["data"]] == [after]

    async def test_only_the_callers_events(self, api: Api) -> None:
        mine, theirs = await api.customer(), await api.customer()
        await job_with(api, theirs, "completed", completed())
        assert (await feed(api, mine))["data"] == []
        assert len((await feed(api, theirs))["data"]) == 1

    async def test_recent_events_wait_out_the_delay(self, api: Api) -> None:
        customer = await api.customer()
        await job_with(api, customer, "completed", completed())
        async with api.deps.sessionmaker() as session:
            page = await event_feed.read(
                session, customer.account_id, after=None, limit=10, delay=60
            )
        assert (page.events, page.next_cursor) == ([], None)

    async def test_bad_cursor(self, api: Api) -> None:
        customer = await api.customer()
        async with api.client(customer) as client:
            answer = await client.get("/v1/events", params={"after": "msg_123"})
        assert_problem(answer, 422, "invalid_cursor")
