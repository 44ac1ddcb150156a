"""`enqueue` and `redeliver`: targets, subscriptions, idempotency, the caller's transaction."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from aigen.clock import utcnow
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import WebhookDelivery
from aigen.notifications import service
from aigen.notifications.service import (
    JOB_CANCELED,
    JOB_COMPLETED,
    JOB_FAILED,
    WebhookDeliveryNotFound,
)

from .factories import create_account, create_endpoint, create_job

URL = "https://hooks.example.com/job"


async def count_deliveries(sessionmaker: Sessionmaker) -> int:
    async with sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(WebhookDelivery)) or 0)


class TestEnqueue:
    async def test_job_url_then_subscribed_endpoints(self, sessionmaker: Sessionmaker) -> None:
        async with unit_of_work(sessionmaker) as session:
            account = await create_account(session)
            other = await create_account(session, name="other")
            everything = await create_endpoint(session, account, url="https://a.example.com/")
            failures = await create_endpoint(
                session, account, url="https://b.example.com/", events=[JOB_FAILED]
            )
            await create_endpoint(session, other, url="https://c.example.com/")
            await create_endpoint(
                session, account, url="https://d.example.com/", disabled_at=utcnow()
            )
            job = await create_job(session, account, webhook_url=URL)
            created = await service.enqueue(session, job=job, event_type=JOB_COMPLETED)
            failed = await service.enqueue(session, job=job, event_type=JOB_FAILED)

        assert [d.target for d in created] == [f"url:{URL}", f"endpoint:{everything.id}"]
        assert [d.endpoint_id for d in created] == [None, everything.id]
        assert {d.target for d in failed} == {
            f"url:{URL}",
            f"endpoint:{everything.id}",
            f"endpoint:{failures.id}",
        }
        first = created[0]
        assert first.id.startswith("msg_")
        assert (first.status, first.attempts, first.url) == ("pending", 0, URL)
        assert first.next_attempt_at is not None
        assert abs(first.next_attempt_at - utcnow()) < timedelta(seconds=5)
        assert first.account_id == account.id
        assert first.job_id == job.id

    async def test_job_events_filter_the_job_url(self, sessionmaker: Sessionmaker) -> None:
        async with unit_of_work(sessionmaker) as session:
            account = await create_account(session)
            job = await create_job(session, account, webhook_url=URL, webhook_events=[JOB_FAILED])
            assert await service.enqueue(session, job=job, event_type=JOB_COMPLETED) == []
            failed = await service.enqueue(session, job=job, event_type=JOB_FAILED)
        assert [d.target for d in failed] == [f"url:{URL}"]

    async def test_empty_event_list_means_all(self, sessionmaker: Sessionmaker) -> None:
        async with unit_of_work(sessionmaker) as session:
            account = await create_account(session)
            await create_endpoint(session, account, url="https://a.example.com/", events=[])
            job = await create_job(session, account, webhook_url=URL, webhook_events=[])
            created = await service.enqueue(session, job=job, event_type=JOB_CANCELED)
        assert len(created) == 2

    async def test_no_targets(self, sessionmaker: Sessionmaker) -> None:
        async with unit_of_work(sessionmaker) as session:
            job = await create_job(session, await create_account(session))
            assert await service.enqueue(session, job=job, event_type=JOB_COMPLETED) == []

    async def test_idempotent(self, sessionmaker: Sessionmaker) -> None:
        async with unit_of_work(sessionmaker) as session:
            account = await create_account(session)
            await create_endpoint(session, account, url="https://a.example.com/")
            job = await create_job(session, account, webhook_url=URL)
            assert len(await service.enqueue(session, job=job, event_type=JOB_COMPLETED)) == 2
        # A redelivered bus event, in a transaction of its own.
        async with unit_of_work(sessionmaker) as session:
            assert await service.enqueue(session, job=job, event_type=JOB_COMPLETED) == []
        assert await count_deliveries(sessionmaker) == 2

    async def test_never_commits(self, sessionmaker: Sessionmaker) -> None:
        async with sessionmaker() as session:
            account = await create_account(session)
            job = await create_job(session, account, webhook_url=URL)
            assert len(await service.enqueue(session, job=job, event_type=JOB_COMPLETED)) == 1
            await session.rollback()
        assert await count_deliveries(sessionmaker) == 0

    async def test_unknown_event_type(self, sessionmaker: Sessionmaker) -> None:
        async with unit_of_work(sessionmaker) as session:
            job = await create_job(session, await create_account(session), webhook_url=URL)
            with pytest.raises(ValueError, match="unknown webhook event type"):
                await service.enqueue(session, job=job, event_type="job.completed")


class TestRedeliver:
    async def test_resets_to_pending_now(self, sessionmaker: Sessionmaker) -> None:
        async with unit_of_work(sessionmaker) as session:
            account = await create_account(session)
            job = await create_job(session, account, webhook_url=URL)
            (delivery,) = await service.enqueue(session, job=job, event_type=JOB_COMPLETED)
            delivery.status, delivery.attempts = "failed", 4
            delivery.next_attempt_at = None
        async with sessionmaker() as session:
            # What `enqueue` returns is in the session: a change to it is saved.
            stored = await session.get(WebhookDelivery, delivery.id)
            assert stored is not None
            assert (stored.status, stored.attempts) == ("failed", 4)
        async with unit_of_work(sessionmaker) as session:
            again = await service.redeliver(session, delivery.id, account_id=account.id)
        assert (again.id, again.status, again.attempts) == (delivery.id, "pending", 0)
        assert again.next_attempt_at is not None

    async def test_other_account_is_not_found(self, sessionmaker: Sessionmaker) -> None:
        async with unit_of_work(sessionmaker) as session:
            account = await create_account(session)
            job = await create_job(session, account, webhook_url=URL)
            (delivery,) = await service.enqueue(session, job=job, event_type=JOB_COMPLETED)
        async with unit_of_work(sessionmaker) as session:
            with pytest.raises(WebhookDeliveryNotFound):
                await service.redeliver(session, delivery.id, account_id="acc_other")
            with pytest.raises(WebhookDeliveryNotFound):
                await service.redeliver(session, "msg_missing")
