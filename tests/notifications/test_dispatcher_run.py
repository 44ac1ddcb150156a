"""The dispatcher as a process: bounded concurrency, several at once, stop and restart."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from aigen.config import Settings
from aigen.db.session import Sessionmaker, create_engine, create_sessionmaker, unit_of_work
from aigen.notifications import dispatcher as dispatcher_module
from aigen.notifications import service
from aigen.notifications.dispatcher import Dispatcher
from aigen.notifications.service import JOB_COMPLETED

from .factories import create_account, create_job
from .helpers import build_payload, eventually, load_attempts, load_deliveries, settled
from .receiver import Answer, WebhookReceiverDouble


async def jobs_to(sessionmaker: Sessionmaker, urls: list[str]) -> list[str]:
    """One completed job per URL; returns the delivery ids."""
    ids: list[str] = []
    async with unit_of_work(sessionmaker) as session:
        account = await create_account(session)
        for url in urls:
            job = await create_job(session, account, webhook_url=url)
            ids += [d.id for d in await service.enqueue(session, job=job, event_type=JOB_COMPLETED)]
    return ids


@pytest.fixture
async def second_sessionmaker(database_url: str, engine: object) -> AsyncIterator[Sessionmaker]:
    """A sessionmaker on an engine of its own, as a second notifier process would have."""
    other = create_engine(database_url)
    yield create_sessionmaker(other)
    await other.dispose()


class TestConcurrency:
    async def test_run_once_attempts_concurrently(
        self, sessionmaker: Sessionmaker, settings: Settings, receiver: WebhookReceiverDouble
    ) -> None:
        receiver.default = Answer(200, delay=0.4)
        await jobs_to(sessionmaker, [receiver.url()] * 5)
        async with Dispatcher(
            sessionmaker, settings, payload_builder=build_payload, concurrency=3
        ) as dispatcher:
            started = time.monotonic()
            assert await dispatcher.run_once() == 3
            assert time.monotonic() - started < 1.1  # 3 × 0.4 s one after another would be 1.2
            assert await dispatcher.run_once() == 2
        assert receiver.max_in_flight == 3

    async def test_run_never_exceeds_the_limit(
        self, sessionmaker: Sessionmaker, settings: Settings, receiver: WebhookReceiverDouble
    ) -> None:
        receiver.default = Answer(200, delay=0.1)
        await jobs_to(sessionmaker, [receiver.url()] * 8)
        stop = asyncio.Event()
        dispatcher = Dispatcher(
            sessionmaker, settings, payload_builder=build_payload, concurrency=2
        )
        task = asyncio.create_task(dispatcher.run(stop))
        await eventually(lambda: settled(sessionmaker))
        stop.set()
        await task
        assert len(receiver.requests) == 8
        assert receiver.max_in_flight == 2


class TestSeveralDispatchers:
    async def test_each_attempt_is_made_once(
        self,
        sessionmaker: Sessionmaker,
        second_sessionmaker: Sessionmaker,
        settings: Settings,
        receiver: WebhookReceiverDouble,
    ) -> None:
        paths = [f"/hook/{i}" for i in range(12)]
        for path in paths:
            receiver.script(path, Answer(500), Answer(200))
        ids = await jobs_to(sessionmaker, [receiver.url(path) for path in paths])

        stop = asyncio.Event()
        dispatchers = [
            Dispatcher(maker, settings, payload_builder=build_payload, concurrency=4)
            for maker in (sessionmaker, second_sessionmaker)
        ]
        tasks = [asyncio.create_task(d.run(stop)) for d in dispatchers]
        await eventually(lambda: settled(sessionmaker), within=20)
        stop.set()
        await asyncio.gather(*tasks)

        per_message = Counter(r.webhook_id for r in receiver.requests)
        assert per_message == dict.fromkeys(ids, 2)
        for delivery in await load_deliveries(sessionmaker):
            assert (delivery.status, delivery.attempts) == ("delivered", 2)
            attempts = await load_attempts(sessionmaker, delivery.id)
            assert [a.status_code for a in attempts] == [500, 200]


class TestStop:
    async def test_finishes_the_attempt_in_hand(
        self, sessionmaker: Sessionmaker, settings: Settings, receiver: WebhookReceiverDouble
    ) -> None:
        receiver.script("/hook", Answer(200, delay=0.5))
        await jobs_to(sessionmaker, [receiver.url()])
        stop = asyncio.Event()
        dispatcher = Dispatcher(sessionmaker, settings, payload_builder=build_payload)
        task = asyncio.create_task(dispatcher.run(stop))
        await receiver.wait_for(1)
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        (delivery,) = await load_deliveries(sessionmaker)
        assert delivery.status == "delivered"

    async def test_a_new_dispatcher_picks_up_the_schedule(
        self,
        sessionmaker: Sessionmaker,
        second_sessionmaker: Sessionmaker,
        settings: Settings,
        receiver: WebhookReceiverDouble,
    ) -> None:
        receiver.script("/hook", Answer(500), Answer(500), Answer(500), Answer(200))
        (delivery_id,) = await jobs_to(sessionmaker, [receiver.url()])

        stop = asyncio.Event()
        first = Dispatcher(sessionmaker, settings, payload_builder=build_payload)
        task = asyncio.create_task(first.run(stop))
        await receiver.wait_for(1)
        stop.set()
        await task
        (mid,) = await load_deliveries(sessionmaker)
        assert (mid.status, mid.leased_until) == ("pending", None)
        assert 1 <= mid.attempts < 4

        # A new notifier process (its own engine) carries on from the stored schedule.
        stop = asyncio.Event()
        second = Dispatcher(second_sessionmaker, settings, payload_builder=build_payload)
        task = asyncio.create_task(second.run(stop))
        await eventually(lambda: settled(sessionmaker))
        stop.set()
        await task

        assert [r.webhook_id for r in receiver.requests] == [delivery_id] * 4
        (done,) = await load_deliveries(sessionmaker)
        assert (done.status, done.attempts) == ("delivered", 4)
        attempts = await load_attempts(sessionmaker, delivery_id)
        assert [a.status_code for a in attempts] == [500, 500, 500, 200]


class TestWake:
    async def test_a_wake_up_claims_at_once_not_at_the_poll(
        self, sessionmaker: Sessionmaker, settings: Settings, receiver: WebhookReceiverDouble
    ) -> None:
        # The poll is an hour: only `wake()` (the handler in the same process, once its
        # deliveries are committed) can get the webhook out within the test's patience.
        slow = settings.model_copy(update={"poll_interval_seconds": 3600.0})
        stop = asyncio.Event()
        dispatcher = Dispatcher(sessionmaker, slow, payload_builder=build_payload)
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            await asyncio.sleep(0.3)  # the first claim found nothing; the loop now sleeps
            (delivery_id,) = await jobs_to(sessionmaker, [receiver.url()])
            dispatcher.wake()
            await asyncio.wait_for(receiver.wait_for(1), 10)
            assert receiver.requests[0].webhook_id == delivery_id
        finally:
            stop.set()
            await task


class TestIdle:
    async def test_a_retry_wakes_the_dispatcher_at_its_time(
        self,
        sessionmaker: Sessionmaker,
        settings: Settings,
        receiver: WebhookReceiverDouble,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # Idle, the loop would not look again for a minute: only the retry's own timer can
        # bring the second attempt (0.1 s after the first, by the test schedule) in time.
        monkeypatch.setattr(dispatcher_module, "IDLE_POLL_SECONDS", 60.0)
        monkeypatch.setattr(dispatcher_module, "IDLE_POLL_FACTOR", 6000)
        receiver.script("/flaky", Answer(503), Answer(200))
        stop = asyncio.Event()
        dispatcher = Dispatcher(sessionmaker, settings, payload_builder=build_payload)
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            await asyncio.sleep(0.3)  # its first claim found nothing: it sleeps
            await jobs_to(sessionmaker, [receiver.url("/flaky")])
            dispatcher.wake()  # as the notifier's handler does for a delivery it made
            await eventually(lambda: settled(sessionmaker), within=10)
        finally:
            stop.set()
            await task
        [delivery] = await load_deliveries(sessionmaker)
        assert delivery.status == "delivered"
        assert [r.path for r in receiver.requests] == ["/flaky", "/flaky"]


class TestRecords:
    async def test_an_attempt_waiting_for_its_record_holds_no_slot(
        self, sessionmaker: Sessionmaker, settings: Settings, receiver: WebhookReceiverDouble
    ) -> None:
        # The poll is an hour: the second claim can only come from the slot the first
        # attempt frees when its request ends, long before its record (a second later).
        slow = settings.model_copy(update={"poll_interval_seconds": 3600.0})
        await jobs_to(sessionmaker, [receiver.url()] * 2)
        stop = asyncio.Event()
        dispatcher = Dispatcher(
            sessionmaker, slow, payload_builder=build_payload, concurrency=1, settle_linger=1.0
        )
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            await asyncio.wait_for(receiver.wait_for(2), 5)
            # Both webhooks went out, one at a time, while the first record still waited.
            assert [d.status for d in await load_deliveries(sessionmaker)] == ["pending"] * 2
            assert receiver.max_in_flight == 1
            await eventually(lambda: settled(sessionmaker))
        finally:
            stop.set()
            await task
        for delivery in await load_deliveries(sessionmaker):
            assert (delivery.status, delivery.attempts) == ("delivered", 1)
            assert [a.status_code for a in await load_attempts(sessionmaker, delivery.id)] == [200]
