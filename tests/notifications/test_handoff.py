"""The handler hands new deliveries to the dispatcher of its process: the first attempt
starts at once, without a claim, and only in the slots the dispatcher has free."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from aigen.bus.messages import AIGenerationJobCompleted, Envelope
from aigen.clock import utcnow
from aigen.config import Settings
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.notifications import handlers, repository
from aigen.notifications.dispatcher import Dispatcher
from aigen.notifications.service import JOB_COMPLETED, JOB_FAILED

from .factories import create_account, create_endpoint, create_job
from .helpers import build_payload, eventually, load_attempts, load_deliveries, settled
from .receiver import Answer, WebhookReceiverDouble


async def completed_job(sessionmaker: Sessionmaker, url: str) -> Envelope:
    async with unit_of_work(sessionmaker) as session:
        account = await create_account(session)
        job = await create_job(session, account, webhook_url=url)
    return Envelope.wrap(
        AIGenerationJobCompleted(
            job_id=job.id, account_id=account.id, attempt=1, assets=[], usage={}
        )
    )


@asynccontextmanager
async def dispatching(dispatcher: Dispatcher) -> AsyncIterator[None]:
    """The dispatcher's loop running (and waiting) for the block, stopped after it."""
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop))
    try:
        await asyncio.sleep(0.2)
        yield
    finally:
        stop.set()
        await running


@pytest.fixture
def claims_made(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many deliveries each of the dispatcher's own claims took."""
    made: list[int] = []
    claim_due = repository.claim_due

    async def counted(*args: Any, **kwargs: Any) -> list[repository.Claim]:
        claims = await claim_due(*args, **kwargs)
        made.append(len(claims))
        return claims

    monkeypatch.setattr(repository, "claim_due", counted)
    return made


async def test_a_new_delivery_is_attempted_without_a_claim(
    sessionmaker: Sessionmaker,
    settings: Settings,
    receiver: WebhookReceiverDouble,
    claims_made: list[int],
) -> None:
    # The poll is an hour: only the hand-over can get the webhook out in time.
    slow = settings.model_copy(update={"poll_interval_seconds": 3600.0})
    dispatcher = Dispatcher(sessionmaker, slow, payload_builder=build_payload)
    handle = handlers.make_handler(sessionmaker, dispatcher=dispatcher)
    async with dispatching(dispatcher):
        envelope = await completed_job(sessionmaker, receiver.url())
        await handle(envelope)
        await asyncio.wait_for(receiver.wait_for(1), 10)
        await eventually(lambda: settled(sessionmaker))

    (delivery,) = await load_deliveries(sessionmaker)
    assert (delivery.status, delivery.attempts) == ("delivered", 1)
    assert [a.status_code for a in await load_attempts(sessionmaker, delivery.id)] == [200]
    assert receiver.requests[0].webhook_id == delivery.id
    assert sum(claims_made) == 0  # every claim the loop made found nothing to take


async def test_a_full_dispatcher_leaves_the_delivery_to_its_next_claim(
    sessionmaker: Sessionmaker,
    settings: Settings,
    receiver: WebhookReceiverDouble,
    claims_made: list[int],
) -> None:
    receiver.script("/busy", Answer(200, delay=0.6))
    dispatcher = Dispatcher(sessionmaker, settings, payload_builder=build_payload, concurrency=1)
    handle = handlers.make_handler(sessionmaker, dispatcher=dispatcher)
    async with dispatching(dispatcher):
        await handle(await completed_job(sessionmaker, receiver.url("/busy")))
        await receiver.wait_for(1)  # the only slot is taken by this slow attempt
        await handle(await completed_job(sessionmaker, receiver.url("/next")))
        pending = [d for d in await load_deliveries(sessionmaker) if d.url.endswith("/next")]
        assert [(d.attempts, d.leased_until) for d in pending] == [(0, None)]
        await eventually(lambda: settled(sessionmaker))

    assert len(receiver.requests) == 2
    assert sum(claims_made) == 1  # the second delivery, once the slot was free
    assert receiver.max_in_flight == 1


async def test_an_event_that_makes_no_new_delivery_gives_its_slots_back(
    sessionmaker: Sessionmaker, settings: Settings, receiver: WebhookReceiverDouble
) -> None:
    # A second event for a job (another id, so not a redelivery) whose deliveries exist
    # already: the slots reserved for them must not stay taken.
    dispatcher = Dispatcher(sessionmaker, settings, payload_builder=build_payload, concurrency=2)
    handle = handlers.make_handler(sessionmaker, dispatcher=dispatcher)
    async with dispatching(dispatcher):
        first = await completed_job(sessionmaker, receiver.url())
        await handle(first)
        await eventually(lambda: settled(sessionmaker))
        await handle(Envelope.wrap(first.message()))
        free = dispatcher.reserve(2)
        dispatcher.unreserve(free)

    assert len(await load_deliveries(sessionmaker)) == 1
    assert free == 2


async def test_a_result_reaches_its_url_and_the_accounts_endpoints_that_receive_it(
    sessionmaker: Sessionmaker, settings: Settings, receiver: WebhookReceiverDouble
) -> None:
    # The handler reads the job, its account and the account's endpoints together: each
    # enabled endpoint subscribed to the event gets a delivery signed with its own secret,
    # the job's own URL one signed with the account's; a disabled endpoint, one subscribed
    # to other events and another account's endpoint get none.
    async with unit_of_work(sessionmaker) as session:
        account, other = await create_account(session), await create_account(session)
        job = await create_job(session, account, webhook_url=receiver.url("/own"))
        secrets = {
            "/all": (await create_endpoint(session, account, url=receiver.url("/all"))).secret,
            "/done": (
                await create_endpoint(
                    session, account, url=receiver.url("/done"), events=[JOB_COMPLETED]
                )
            ).secret,
            "/own": account.webhook_secret,
        }
        await create_endpoint(session, account, url=receiver.url("/failures"), events=[JOB_FAILED])
        await create_endpoint(
            session, account, url=receiver.url("/off"), disabled_at=utcnow(), disabled_reason="x"
        )
        await create_endpoint(session, other, url=receiver.url("/other"))
    dispatcher = Dispatcher(sessionmaker, settings, payload_builder=build_payload)
    handle = handlers.make_handler(sessionmaker, dispatcher=dispatcher)
    completed = AIGenerationJobCompleted(
        job_id=job.id, account_id=account.id, attempt=1, assets=[], usage={}
    )
    async with dispatching(dispatcher):
        await handle(Envelope.wrap(completed))
        await asyncio.wait_for(receiver.wait_for(3), 10)
        await eventually(lambda: settled(sessionmaker))

    assert sorted(d.url for d in await load_deliveries(sessionmaker)) == sorted(
        receiver.url(path) for path in secrets
    )
    assert sorted(r.path for r in receiver.requests) == sorted(secrets)
    for request in receiver.requests:
        assert request.verify(secrets[request.path])["data"]["id"] == job.id


async def test_a_result_reads_its_job_account_and_endpoints_once(
    engine: AsyncEngine,
    sessionmaker: Sessionmaker,
    settings: Settings,
    receiver: WebhookReceiverDouble,
) -> None:
    # The job, the account that signs the job's own deliveries and the endpoints come in
    # one read, and the attempt handed over reads none of them again (each read is a
    # round trip and a large part of the notifier's CPU per result).
    envelope = await completed_job(sessionmaker, receiver.url())
    tables: list[str] = []

    def record(_c: Any, _cursor: Any, statement: str, *_: Any) -> None:
        read = re.match(r"SELECT\b.*?\bFROM\s+(\w+)", statement, re.DOTALL)
        if read:
            tables.append(read.group(1))

    dispatcher = Dispatcher(sessionmaker, settings, payload_builder=build_payload)
    handle = handlers.make_handler(sessionmaker, dispatcher=dispatcher)
    async with dispatching(dispatcher):
        event.listen(engine.sync_engine, "before_cursor_execute", record)
        try:
            await handle(envelope)
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", record)
        await asyncio.wait_for(receiver.wait_for(1), 10)
    # (The dispatcher's loop may claim meanwhile: `webhook_deliveries`.)
    assert tables.count("jobs") == 1
    assert not {"accounts", "webhook_endpoints"} & set(tables)
