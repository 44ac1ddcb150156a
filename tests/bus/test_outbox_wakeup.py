"""The relay is woken by a commit that added outbox rows, not only by its poll.

In the same process through an in-memory signal; across processes on PostgreSQL through
PostgreSQL's notices on `aigen_outbox` (the relay below has an engine of its own, as another process
would). The poll interval is set far beyond the test's patience, so only a wake-up can
publish the event in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
from sqlalchemy import event, insert, text

from aigen.bus import outbox
from aigen.bus.messages import AIGenerationJobCanceled, Envelope
from aigen.db import notices
from aigen.db.session import Sessionmaker, create_engine, create_sessionmaker, unit_of_work
from aigen.models import OutboxMessage

NEVER = 3600.0


class RecordingBroker:
    def __init__(self) -> None:
        self.published: list[Envelope] = []
        self.arrived = asyncio.Event()

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self.published.extend(envelopes)
        self.arrived.set()


@asynccontextmanager
async def sleeping_relay(
    sessions: Sessionmaker, broker: RecordingBroker
) -> AsyncIterator[outbox.Relay]:
    """A running relay whose first poll found nothing: from then on it sleeps an hour."""
    relay = outbox.Relay(sessions, broker, poll_interval=NEVER)  # type: ignore[arg-type]
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await asyncio.sleep(0.5)
        yield relay
    finally:
        stop.set()
        await running


async def _published_after_commit(producer: Sessionmaker, relay_sessions: Sessionmaker) -> None:
    broker = RecordingBroker()
    async with sleeping_relay(relay_sessions, broker):
        async with unit_of_work(producer) as session:
            envelope = outbox.add(
                session, AIGenerationJobCanceled(job_id="job-1", account_id="acc-1")
            )
        await asyncio.wait_for(broker.arrived.wait(), 20)
        assert [e.id for e in broker.published] == [envelope.id]


async def test_a_commit_wakes_the_relay(sessionmaker: Sessionmaker, database_url: str) -> None:
    if database_url.startswith("sqlite"):
        # One process: the same engine, woken in memory.
        await _published_after_commit(sessionmaker, sessionmaker)
        return
    # PostgreSQL: the relay's engine is another one, woken by NOTIFY.
    engine = create_engine(database_url)
    try:
        await _published_after_commit(sessionmaker, create_sessionmaker(engine))
    finally:
        await engine.dispose()


async def test_a_rollback_publishes_nothing(sessionmaker: Sessionmaker) -> None:
    broker = RecordingBroker()
    async with sleeping_relay(sessionmaker, broker) as relay:
        try:
            async with unit_of_work(sessionmaker) as session:
                outbox.add(session, AIGenerationJobCanceled(job_id="job-1", account_id="acc-1"))
                raise RuntimeError("rolled back")
        except RuntimeError:
            pass
        assert await relay.run_once() == 0
        assert broker.published == []


async def test_a_failed_publish_leaves_the_rows_for_the_next_look_in_order(
    sessionmaker: Sessionmaker,
) -> None:
    class FailingOnceBroker(RecordingBroker):
        async def publish(self, envelopes: Sequence[Envelope]) -> None:
            if not hasattr(self, "failed"):
                self.failed = True
                raise ConnectionError("the broker is away")
            await super().publish(envelopes)

    broker = FailingOnceBroker()
    relay = outbox.Relay(sessionmaker, broker, batch=10)  # type: ignore[arg-type]
    async with unit_of_work(sessionmaker) as session:
        sent = [
            outbox.add(session, AIGenerationJobCanceled(job_id=f"job-{n}", account_id="acc-1"))
            for n in range(3)
        ]
    with pytest.raises(ConnectionError):
        await relay.run_once()
    assert await relay.run_once() == 3
    assert [e.id for e in broker.published] == [e.id for e in sent]
    assert await relay.run_once() == 0


# NOTIFY is PostgreSQL's (SQLite has one process, whose relays are woken in memory).
@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_relay_listens_again_after_losing_its_connection(
    sessionmaker: Sessionmaker, database_url: str
) -> None:
    engine = create_engine(database_url)
    broker = RecordingBroker()
    try:
        relay_sessions = create_sessionmaker(engine)
        # Only a notice can wake the relay: its poll is an hour.
        relay = outbox.Relay(relay_sessions, broker, poll_interval=NEVER)  # type: ignore[arg-type]
        stop = asyncio.Event()
        running = asyncio.create_task(relay.run(stop))
        try:
            await asyncio.sleep(0.5)
            async with unit_of_work(sessionmaker) as session:
                # The server ends the relay's listening connection, as a restart would.
                await session.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE query LIKE 'LISTEN%' AND datname = current_database()"
                    )
                )
            await asyncio.sleep(1.0)
            async with unit_of_work(sessionmaker) as session:
                envelope = outbox.add(
                    session, AIGenerationJobCanceled(job_id="job-2", account_id="acc-1")
                )
                # As from another process: no wake-up in memory, only the notice.
                session.info.pop(notices._PENDING)
                await session.execute(text(f"NOTIFY {outbox.CHANNEL}"))
            await asyncio.wait_for(broker.arrived.wait(), 5)
            assert [e.id for e in broker.published] == [envelope.id]
        finally:
            stop.set()
            await running
    finally:
        await engine.dispose()


async def test_an_idle_relay_looks_less_often_and_still_finds_a_row_no_one_announced(
    sessionmaker: Sessionmaker,
) -> None:
    broker = RecordingBroker()
    relay = outbox.Relay(sessionmaker, broker, poll_interval=0.01, idle_poll_max=0.2)  # type: ignore[arg-type]
    looks: list[str] = []
    engine = sessionmaker.kw["bind"].sync_engine

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith("UPDATE outbox_messages SET sent_at"):  # a look
            looks.append(statement)

    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        event.listen(engine, "before_cursor_execute", count)
        await asyncio.sleep(1.5)
        event.remove(engine, "before_cursor_execute", count)
        # Every 10 ms would be about 150 looks; backing off to 200 ms, about a dozen (on
        # PostgreSQL, whose notices wake the relay, one a second).
        assert 1 <= len(looks) <= 30
        # A row written without a wake-up (as by another process on SQLite, which has no
        # notices) is published by the next poll, within the longest wait.
        envelope = Envelope.wrap(AIGenerationJobCanceled(job_id="job-1", account_id="acc-1"))
        async with unit_of_work(sessionmaker) as session:
            await session.execute(insert(OutboxMessage), [outbox._row(envelope)])
        await asyncio.wait_for(broker.arrived.wait(), 5)
        assert [e.id for e in broker.published] == [envelope.id]
    finally:
        stop.set()
        await running
