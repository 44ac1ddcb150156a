"""The notifier's events that arrive together: the same deliveries as one event after
another, in three statements for all of them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from aigen.bus.broker import Retry
from aigen.bus.messages import AIGenerationJobCompleted, Envelope
from aigen.config import Settings
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import Account, Asset, InboxMessage, Job
from aigen.notifications import handlers
from aigen.notifications.dispatcher import Dispatcher
from aigen.notifications.service import JOB_COMPLETED
from aigen.storage.filesystem import FilesystemStore
from tests.fixtures.asyncpg_calls import count_begins

from .factories import create_account, create_endpoint, create_job
from .helpers import load_deliveries


def _event(job_id: str, account_id: str) -> Envelope:
    return Envelope.wrap(
        AIGenerationJobCompleted(
            job_id=job_id, account_id=account_id, attempt=1, assets=[], usage={}
        )
    )


async def _jobs(sessionmaker: Sessionmaker) -> tuple[list[Envelope], str, str]:
    """Events of three jobs, in the order they come: one with a URL; one whose account
    also has an endpoint; one the backend has not ended yet (still processing); then the
    first event again, an event of a job that does not exist, and another event of the
    first job (another id: not a redelivery). And the ids of the processing job and of
    the endpoint."""
    async with unit_of_work(sessionmaker) as session:
        alone, with_endpoint = await create_account(session), await create_account(session)
        endpoint = await create_endpoint(session, with_endpoint, url="https://example.com/hook")
        first = await create_job(session, alone, webhook_url="https://example.com/own")
        second = await create_job(session, with_endpoint, webhook_url="https://example.com/2")
        running = await create_job(
            session, alone, status="processing", webhook_url="https://example.com/3"
        )
    events = [_event(job.id, job.account_id) for job in (first, second, running)]
    again = _event(first.id, alone.id)
    return [*events, events[0], _event("job_gone", alone.id), again], running.id, endpoint.id


def _made(events: list[Envelope], endpoint_id: str) -> set[tuple[str, str]]:
    """The deliveries (job, target) that `_jobs`' events make: the first job's URL, the
    second's and its account's endpoint."""
    return {
        (str(events[0].job_id), "url:https://example.com/own"),
        (str(events[1].job_id), "url:https://example.com/2"),
        (str(events[1].job_id), f"endpoint:{endpoint_id}"),
    }


async def _recorded(sessionmaker: Sessionmaker) -> set[str]:
    async with sessionmaker() as session:
        return set(await session.scalars(select(InboxMessage.event_id)))


async def test_events_together_come_out_as_one_after_the_other(
    engine: AsyncEngine, sessionmaker: Sessionmaker
) -> None:
    events, running, endpoint_id = await _jobs(sessionmaker)
    handle = handlers.make_handler(sessionmaker)

    statements = _statements(engine)
    outcomes = await asyncio.gather(*(handle(e) for e in events), return_exceptions=True)
    assert len(statements) == 3  # they went together: one transaction's three statements

    waited = [isinstance(outcome, Retry) for outcome in outcomes]
    assert waited == [False, False, True, False, False, False]
    deliveries = {(d.job_id, d.target) for d in await load_deliveries(sessionmaker)}
    assert deliveries == _made(events, endpoint_id)
    # Every event but the one that waits is recorded, the missing job's too.
    assert await _recorded(sessionmaker) == {events[n].id for n in (0, 1, 4, 5)}

    # Once the backend has ended it, the waiting event makes its delivery.
    async with unit_of_work(sessionmaker) as session:
        await session.execute(update(Job).where(Job.id == running).values(status="completed"))
    await handle(events[2])
    made = [d for d in await load_deliveries(sessionmaker) if d.job_id == running]
    assert [(d.target, d.event_type) for d in made] == [
        ("url:https://example.com/3", JOB_COMPLETED)
    ]


@pytest.mark.parametrize("count", [3, 8])
async def test_events_together_are_three_statements_however_many(
    engine: AsyncEngine, sessionmaker: Sessionmaker, count: int
) -> None:
    async with unit_of_work(sessionmaker) as session:
        account = await create_account(session)
        await create_endpoint(session, account, url="https://example.com/hook")
        jobs = [
            await create_job(session, account, webhook_url="https://example.com/own")
            for _ in range(count)
        ]
    envelopes = [handlers._Event(_event(job.id, account.id)) for job in jobs]
    statements = _statements(engine)
    async with unit_of_work(sessionmaker) as session:
        enqueued = await handlers._enqueue_many(session, envelopes, None)
        # The jobs with their targets, the inbox rows, the deliveries.
        assert len(statements) == 3
    assert [outcome.created if outcome else None for outcome in enqueued] == [2] * count
    assert len(await load_deliveries(sessionmaker)) == 2 * count


async def test_events_alone_come_out_as_together(
    engine: AsyncEngine, sessionmaker: Sessionmaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same events one at a time (most come alone below the maximum): the same
    deliveries and records as together, and on PostgreSQL an event whose job has ended
    is a read of the job and one statement (its inbox row and its deliveries), with no
    BEGIN: each commits by itself."""
    events, _, endpoint_id = await _jobs(sessionmaker)
    handle = handlers.make_handler(sessionmaker)
    statements = _statements(engine)
    begins = count_begins(monkeypatch)

    waited = []
    for number, envelope in enumerate(events):
        try:
            await handle(envelope)
        except Retry:
            waited.append(number)
        if number == 0:
            first = ([statement.split()[0] for statement in statements], len(begins))

    assert waited == [2]
    deliveries = {(d.job_id, d.target) for d in await load_deliveries(sessionmaker)}
    assert deliveries == _made(events, endpoint_id)
    assert await _recorded(sessionmaker) == {events[n].id for n in (0, 1, 4, 5)}
    if engine.dialect.name == "postgresql":
        assert first == (["SELECT", "WITH"], 0)
    # Redelivered once its account has an endpoint too: recorded, so it makes nothing.
    async with unit_of_work(sessionmaker) as session:
        job = await session.get(Job, events[0].job_id)
        assert job is not None
        account = await session.get(Account, job.account_id)
        assert account is not None
        await create_endpoint(session, account, url="https://example.com/later")
    await handle(events[0])
    assert len(await load_deliveries(sessionmaker)) == len(deliveries)


@pytest.mark.parametrize("count", [1, 5])
async def test_the_payloads_of_events_together_read_their_assets_in_one_statement(
    engine: AsyncEngine,
    sessionmaker: Sessionmaker,
    settings: Settings,
    tmp_path: Path,
    count: int,
) -> None:
    # Each job has assets of its own (among several, one none at all), and its account two
    # endpoints besides the job's URL: each payload handed to the dispatcher lists its own
    # job's assets, once each, and they were all read in one statement (an event alone on
    # PostgreSQL: with its job and targets).
    sizes = [2] if count == 1 else [number % 3 for number in range(count)]
    async with unit_of_work(sessionmaker) as session:
        account = await create_account(session)
        for name in ("a", "b"):
            await create_endpoint(session, account, url=f"https://example.com/{name}")
        jobs = [
            await create_job(session, account, webhook_url="https://example.com/own")
            for _ in range(count)
        ]
        for number, job in enumerate(jobs):
            for index in range(sizes[number]):
                session.add(
                    Asset(
                        job_id=job.id,
                        index=index,
                        key=f"{job.id}/{index}.txt",
                        content_type="text/plain",
                        bytes=index + 1,
                        sha256=f"{number:02d}{index:062d}",
                    )
                )
    store = FilesystemStore(tmp_path, secret="s" * 32, public_url="http://127.0.0.1:8000")
    builder = handlers.make_payload_builder(store, settings)
    dispatcher = Dispatcher(sessionmaker, settings, payload_builder=builder)
    events = [handlers._Event(_event(job.id, account.id)) for job in jobs]
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop))  # it leases only while it runs
    await asyncio.sleep(0.1)
    statements = _statements(engine)
    async with unit_of_work(sessionmaker) as session:
        enqueued = await handlers._enqueue_many(session, events, dispatcher)
    dispatcher.unreserve(sum(event.reserved for event in events))
    stop.set()
    await running
    # The jobs with their targets, the inbox rows, the deliveries, the assets (the
    # running dispatcher's own claims of due deliveries apart); an event alone on
    # PostgreSQL has its assets read with its job and targets, and its inbox row and
    # deliveries in one statement.
    ours = [s for s in statements if not s.startswith("UPDATE webhook_deliveries")]
    alone = count == 1 and engine.dialect.name == "postgresql"
    assert len(ours) == (2 if alone else 4)
    for number, (job, outcome) in enumerate(zip(jobs, enqueued, strict=True)):
        assert outcome is not None
        assert len(outcome.handed) == 3  # the job's URL and the two endpoints
        for _, message in outcome.handed:
            data = json.loads(message.body)["data"]
            assert data["id"] == job.id
            assert [a["sha256"] for a in data["assets"]] == [
                f"{number:02d}{index:062d}" for index in range(sizes[number])
            ]
            assert all(a["url"].startswith("http://127.0.0.1:8000/") for a in data["assets"])


def _statements(engine: AsyncEngine) -> list[str]:
    """The statements sent from now on, BEGIN and COMMIT apart."""
    statements: list[str] = []

    def count(*args: object) -> None:
        statement = str(args[2])
        if not statement.startswith(("BEGIN", "COMMIT")):
            statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    return statements
