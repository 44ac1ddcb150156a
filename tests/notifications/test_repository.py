"""Claims and their fence: no delivery is claimed twice; a stale outcome changes nothing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine

from aigen.clock import utcnow
from aigen.config import Settings
from aigen.db.group import GroupCommit
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import WebhookDelivery, WebhookEndpoint
from aigen.notifications import dispatcher, repository, service
from aigen.notifications.dispatcher import Dispatcher
from aigen.notifications.sender import AttemptResult
from aigen.notifications.service import JOB_COMPLETED
from tests.fixtures.asyncpg_calls import count_begins

from .factories import create_account, create_endpoint, create_job
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


class TestClaimAlone:
    async def test_the_dispatchers_claim_commits_by_itself(
        self,
        engine: AsyncEngine,
        sessionmaker: Sessionmaker,
        settings: Settings,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The dispatcher's claim of due deliveries is a transaction of one statement: on
        PostgreSQL it commits by itself (no BEGIN), and what it leased stays leased."""
        ids = {await one_delivery(sessionmaker, f"https://hooks.example.com/{n}") for n in (1, 2)}
        begins = count_begins(monkeypatch)
        async with Dispatcher(sessionmaker, settings, payload_builder=build_payload) as d:
            claims = await d._claim(10)
        claimed = len(begins)

        assert {c.id for c in claims} == ids
        assert all(c.attempt == 1 for c in claims)
        assert await claim(sessionmaker) == []  # leased: no second claim takes them
        if engine.dialect.name == "postgresql":
            assert claimed == 0


class TestAttemptsEndingTogether:
    async def test_successes_are_settled_in_one_statement_and_only_if_still_claimed(
        self, sessionmaker: Sessionmaker
    ) -> None:
        for n in range(3):
            await one_delivery(sessionmaker, f"https://hooks.example.com/{n}")
        claims = await claim(sessionmaker)
        async with unit_of_work(sessionmaker) as session:
            # The last one's lease ran out and another notifier claimed it again.
            again = await session.get(WebhookDelivery, claims[2].id)
            assert again is not None
            again.attempts += 1
        now = utcnow()
        async with unit_of_work(sessionmaker) as session:
            applied = await repository.settle_delivered(session, claims, now)

        assert applied == {claims[0].id, claims[1].id}
        states = {d.id: d for d in await load_deliveries(sessionmaker)}
        for settled in claims[:2]:
            delivery = states[settled.id]
            assert (delivery.status, delivery.delivered_at) == ("delivered", now)
            assert (delivery.leased_until, delivery.next_attempt_at) == (None, None)
        assert states[claims[2].id].status == "pending"

    async def test_a_success_alone_is_one_statement_that_commits_by_itself(
        self,
        engine: AsyncEngine,
        sessionmaker: Sessionmaker,
        settings: Settings,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The record of a success that ends alone (most of them below the maximum): the
        attempt's row and its delivery's new state, one statement on PostgreSQL, which
        commits by itself (no BEGIN). A failure's record is a transaction."""
        for n in range(2):
            await one_delivery(sessionmaker, f"https://hooks.example.com/{n}")
        delivered, retried = await claim(sessionmaker)
        statements: list[str] = []
        event.listen(
            engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2])
        )
        begins = count_begins(monkeypatch)
        group = GroupCommit(sessionmaker)

        def ended(claimed: repository.Claim, result: AttemptResult) -> Any:
            return dispatcher._Ended(claimed, dispatcher.Prepared(None), result, utcnow())

        async with Dispatcher(sessionmaker, settings, payload_builder=build_payload) as d:
            success = await group.run_batched(d._record, ended(delivered, AttemptResult(200)))
            first = ([s.split()[0] for s in statements], len(begins))
            failure = await group.run_batched(d._record, ended(retried, AttemptResult(503)))
            second = len(begins) - first[1]

        assert success[:2] == ("delivered", "delivered")
        assert failure[:2] == ("pending", "pending")
        states = {d.id: d.status for d in await load_deliveries(sessionmaker)}
        assert states == {delivered.id: "delivered", retried.id: "pending"}
        for claimed, code in [(delivered, 200), (retried, 503)]:
            (row,) = await load_attempts(sessionmaker, claimed.id)
            assert row.status_code == code
        if engine.dialect.name == "postgresql":
            assert (first, second) == ((["WITH"], 0), 1)

    async def test_recorded_together_as_each_would_be_alone(
        self, sessionmaker: Sessionmaker, settings: Settings
    ) -> None:
        ok = AttemptResult(status_code=200, latency_ms=3, response_body="ok")
        down = AttemptResult(status_code=503, latency_ms=4, response_body="down")
        since = utcnow() - timedelta(minutes=5)
        urls = [f"https://hooks.example.com/{n}" for n in range(4)]
        for url in urls:
            await one_delivery(sessionmaker, url)
        async with unit_of_work(sessionmaker) as session:
            account = await create_account(session)
            endpoint = await create_endpoint(
                session, account, url="https://hooks.example.com/e", failing_since=since
            )
            job = await create_job(session, account)
            await service.enqueue(session, job=job, event_type=JOB_COMPLETED)
        claims = await claim(sessionmaker)
        by_url = {d.id: d.url for d in await load_deliveries(sessionmaker)}
        to = {by_url[c.id]: c for c in claims}
        superseded = to[urls[3]]
        async with unit_of_work(sessionmaker) as session:
            taken = await session.get(WebhookDelivery, superseded.id)
            assert taken is not None
            taken.attempts += 1
        attempted_at = utcnow()

        def ended(url: str, result: AttemptResult) -> Any:
            message = dispatcher.Prepared(endpoint.id if url.endswith("/e") else None, url=url)
            return dispatcher._Ended(to[url], message, result, attempted_at)

        attempts = [
            ended(urls[0], ok),
            ended(urls[1], down),
            ended("https://hooks.example.com/e", ok),
            ended(urls[2], ok),
            ended(urls[3], ok),
        ]
        async with (
            Dispatcher(sessionmaker, settings, payload_builder=build_payload) as d,
            unit_of_work(sessionmaker) as session,
        ):
            settled = await d._record(session, attempts)

        assert [(planned, outcome) for planned, outcome, _ in settled] == [
            ("delivered", "delivered"),
            ("pending", "pending"),
            ("delivered", "delivered"),
            ("delivered", "delivered"),
            ("delivered", "superseded"),
        ]
        assert settled[1][2] is not None  # the retry's time
        states = {d.url: d for d in await load_deliveries(sessionmaker)}
        assert [states[url].status for url in urls] == [
            "delivered",
            "pending",
            "delivered",
            "pending",
        ]
        assert states["https://hooks.example.com/e"].status == "delivered"
        async with sessionmaker() as session:
            cleared = await session.get(WebhookEndpoint, endpoint.id)
            assert cleared is not None
            assert cleared.failing_since is None  # a success ends the endpoint's failing spell
        for url, result in [(urls[0], ok), (urls[1], down), (urls[3], ok)]:
            (row,) = await load_attempts(sessionmaker, to[url].id)
            assert (row.status_code, row.response_body) == (
                result.status_code,
                result.response_body,
            )
