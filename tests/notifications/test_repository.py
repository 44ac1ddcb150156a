"""Claims and their fence: no delivery is claimed twice; a stale outcome changes nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from aigen.clock import utcnow
from aigen.config import Settings
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import WebhookDelivery
from aigen.notifications import dispatcher, repository, service
from aigen.notifications.dispatcher import Dispatcher
from aigen.notifications.service import JOB_COMPLETED

from .factories import create_account, create_job
from .helpers import build_payload, load_attempts, load_deliveries
from .receiver import WebhookReceiverDouble


async def one_delivery(sessionmaker: Sessionmaker, url: str) -> str:
    async with unit_of_work(sessionmaker) as session:
        job = await create_job(session, await create_account(session), webhook_url=url)
        (delivery,) = await service.enqueue(session, job=job, event_type=JOB_COMPLETED)
    return delivery.id


async def claim(sessionmaker: Sessionmaker, *, lease: float = 60.0) -> list[repository.Claim]:
    now = utcnow()
    async with unit_of_work(sessionmaker) as session:
        return await repository.claim_due(
            session, limit=10, now=now, lease_until=now + timedelta(seconds=lease)
        )


class TestClaimDue:
    async def test_claims_once_and_counts_the_attempt(self, sessionmaker: Sessionmaker) -> None:
        delivery_id = await one_delivery(sessionmaker, "https://hooks.example.com/")
        assert await claim(sessionmaker) == [repository.Claim(delivery_id, 1)]
        assert await claim(sessionmaker) == []
        (delivery,) = await load_deliveries(sessionmaker)
        assert delivery.attempts == 1
        assert delivery.leased_until is not None

    async def test_not_before_it_is_due(self, sessionmaker: Sessionmaker) -> None:
        await one_delivery(sessionmaker, "https://hooks.example.com/")
        async with unit_of_work(sessionmaker) as session:
            (delivery,) = await session.scalars(select(WebhookDelivery))
            delivery.next_attempt_at = utcnow() + timedelta(hours=1)
        assert await claim(sessionmaker) == []

    async def test_expired_lease_is_claimed_again(
        self,
        sessionmaker: Sessionmaker,
        settings: Settings,
        receiver: WebhookReceiverDouble,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        delivery_id = await one_delivery(sessionmaker, receiver.url())
        # A notifier claimed it and died before settling.
        (crashed,) = await claim(sessionmaker, lease=60)
        async with Dispatcher(sessionmaker, settings, payload_builder=build_payload) as d:
            assert await d.run_once() == 0
            # A minute later, by the dispatcher's clock (not by waiting: a wait as short
            # as a test can afford is also as long as a stall of a loaded machine).
            later = utcnow() + timedelta(seconds=61)
            monkeypatch.setattr(dispatcher, "utcnow", lambda: later)
            assert await d.run_once() == 1
        (delivery,) = await load_deliveries(sessionmaker)
        assert (delivery.status, delivery.attempts) == ("delivered", 2)
        # The dead notifier's outcome, arriving late, is refused by the fence.
        async with unit_of_work(sessionmaker) as session:
            assert not await repository.settle(session, crashed, status="failed")
        (delivery,) = await load_deliveries(sessionmaker)
        assert delivery.status == "delivered"
        assert len(await load_attempts(sessionmaker, delivery_id)) == 1
