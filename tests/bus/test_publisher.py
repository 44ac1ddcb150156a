"""A process publishes the events it wrote once they commit (`aigen.bus.publisher`), and
a relay publishes what such a process left: after the lease, or at once after a failed
publish. Nothing is lost, and a rolled-back transaction publishes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from aigen import runtime
from aigen.bootstrap import Deps
from aigen.bus import outbox
from aigen.bus import publisher as publisher_module
from aigen.bus.messages import AIGenerationJobCanceled, Envelope
from aigen.bus.publisher import OutboxPublisher
from aigen.clock import utcnow
from aigen.config import Settings
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import OutboxMessage
from tests.fixtures.asyncpg_calls import count_begins

from .test_outbox_wakeup import RecordingBroker
from .test_rabbitmq import eventually


class BrokerDownDouble(RecordingBroker):
    """A broker that refuses every publish until `up` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.up = False

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if not self.up:
            raise ConnectionError("broker unreachable (test double)")
        await super().publish(envelopes)


@asynccontextmanager
async def publishing(
    sessionmaker: Sessionmaker, broker: RecordingBroker, **options: float
) -> AsyncIterator[OutboxPublisher]:
    publisher = OutboxPublisher(sessionmaker, broker, **options)  # type: ignore[arg-type]
    stop = asyncio.Event()
    running = asyncio.create_task(publisher.run(stop))
    await asyncio.sleep(0.05)  # attached
    try:
        yield publisher
    finally:
        stop.set()
        await running


def _canceled(job_id: str) -> AIGenerationJobCanceled:
    return AIGenerationJobCanceled(job_id=job_id, account_id="acc-1")


async def _rows(sessionmaker: Sessionmaker) -> dict[str, OutboxMessage]:
    async with sessionmaker() as session:
        return {row.event_id: row for row in await session.scalars(select(OutboxMessage))}


async def test_committed_events_are_published_without_a_relay_and_stamped_sent(
    sessionmaker: Sessionmaker,
) -> None:
    broker = RecordingBroker()
    async with publishing(sessionmaker, broker):
        async with unit_of_work(sessionmaker) as session:
            one = outbox.add(session, _canceled("job-1"))
            more = [Envelope.wrap(_canceled(f"job-{n}")) for n in (2, 3)]
            await outbox.add_many(session, more)
        await asyncio.wait_for(broker.arrived.wait(), 5)

        async def stamped() -> bool:
            return all(row.sent_at for row in (await _rows(sessionmaker)).values())

        await eventually(stamped)
    assert [e.id for e in broker.published] == [one.id, *(e.id for e in more)]
    # A relay that looks now finds nothing left to send.
    assert await outbox.Relay(sessionmaker, broker).run_once() == 0  # type: ignore[arg-type]


async def test_a_rolled_back_transaction_publishes_nothing(sessionmaker: Sessionmaker) -> None:
    async def failing() -> None:
        async with unit_of_work(sessionmaker) as session:
            outbox.add(session, _canceled("job-1"))
            await session.flush()
            raise RuntimeError("the transaction fails after its event was added")

    broker = RecordingBroker()
    async with publishing(sessionmaker, broker):
        with pytest.raises(RuntimeError):
            await failing()
        async with unit_of_work(sessionmaker) as session:
            kept = outbox.add(session, _canceled("job-2"))
        await asyncio.wait_for(broker.arrived.wait(), 5)
    assert [e.id for e in broker.published] == [kept.id]
    assert list(await _rows(sessionmaker)) == [kept.id]


async def test_the_relay_leaves_a_leased_row_alone_until_its_lease_ends(
    sessionmaker: Sessionmaker,
) -> None:
    # As if the process that wrote them died after its commit: one row's lease runs on,
    # the other's has ended.
    leased, expired = (Envelope.wrap(_canceled(f"job-{n}")) for n in (1, 2))
    now = utcnow()
    async with unit_of_work(sessionmaker) as session:
        await session.execute(
            insert(OutboxMessage),
            [
                outbox._row(leased, now + timedelta(seconds=10)),
                outbox._row(expired, now - timedelta(seconds=1)),
            ],
        )
    broker = RecordingBroker()
    relay = outbox.Relay(sessionmaker, broker)  # type: ignore[arg-type]
    assert await relay.run_once() == 1
    assert [e.id for e in broker.published] == [expired.id]
    rows = await _rows(sessionmaker)
    assert rows[leased.id].sent_at is None


async def test_a_failed_publish_gives_the_rows_to_the_relay_at_once(
    sessionmaker: Sessionmaker,
) -> None:
    broker = BrokerDownDouble()
    async with publishing(sessionmaker, broker):
        async with unit_of_work(sessionmaker) as session:
            envelope = outbox.add(session, _canceled("job-1"))

        async def released() -> bool:
            return (await _rows(sessionmaker))[envelope.id].dispatch_until is None

        await eventually(released)
        # While the broker is away the process leaves its new events to the relay too.
        async with unit_of_work(sessionmaker) as session:
            later = outbox.add(session, _canceled("job-2"))
        assert (await _rows(sessionmaker))[later.id].dispatch_until is None
    assert broker.published == []
    broker.up = True
    assert await outbox.Relay(sessionmaker, broker).run_once() == 2  # type: ignore[arg-type]
    assert [e.id for e in broker.published] == [envelope.id, later.id]


async def test_after_the_pause_the_process_publishes_its_events_again(
    sessionmaker: Sessionmaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publisher_module, "PAUSE_SECONDS", 0.5)
    broker = BrokerDownDouble()

    async def paused() -> bool:
        return publisher_module._PUBLISHER not in sessionmaker.kw["info"]

    async def back() -> bool:
        return not await paused()

    async with publishing(sessionmaker, broker):
        async with unit_of_work(sessionmaker) as session:
            outbox.add(session, _canceled("job-1"))
        await eventually(paused)  # its publish failed: the process stands aside
        broker.up = True
        await eventually(back)
        async with unit_of_work(sessionmaker) as session:
            again = outbox.add(session, _canceled("job-2"))
        await asyncio.wait_for(broker.arrived.wait(), 5)
    assert [e.id for e in broker.published] == [again.id]


async def test_without_a_publisher_the_rows_are_the_relays_at_once(
    sessionmaker: Sessionmaker,
) -> None:
    async with unit_of_work(sessionmaker) as session:
        envelope = outbox.add(session, _canceled("job-1"))
    assert (await _rows(sessionmaker))[envelope.id].dispatch_until is None
    broker = RecordingBroker()
    assert await outbox.Relay(sessionmaker, broker).run_once() == 1  # type: ignore[arg-type]


async def test_a_stopped_publisher_no_longer_leases_rows(sessionmaker: Sessionmaker) -> None:
    broker = RecordingBroker()
    async with publishing(sessionmaker, broker):
        pass
    async with unit_of_work(sessionmaker) as session:
        envelope = outbox.add(session, _canceled("job-1"))
    assert (await _rows(sessionmaker))[envelope.id].dispatch_until is None
    assert broker.published == []


class ClosableRecordingBroker(RecordingBroker):
    async def aclose(self) -> None:
        pass


async def test_the_publisher_outlives_the_parts_and_the_server_of_its_process(
    engine: AsyncEngine, sessionmaker: Sessionmaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A consumer's message in hand and a request in flight finish after the stop: their
    # events go out from the process at once, not from a relay after the lease.
    stop = asyncio.Event()
    late: list[Envelope] = []

    async def finish_after_stop(delay: float) -> None:
        await stop.wait()
        await asyncio.sleep(delay)
        async with unit_of_work(sessionmaker) as session:
            late.append(outbox.add(session, _canceled(f"job-{delay}")))

    async def part(_deps: object, until: asyncio.Event) -> None:
        assert until is stop
        await finish_after_stop(0.1)

    monkeypatch.setitem(runtime.BACKGROUND, "late", part)
    broker = ClosableRecordingBroker()
    deps = Deps(
        settings=Settings(),
        secret="s" * 32,
        engine=engine,
        sessionmaker=sessionmaker,
        broker=broker,  # type: ignore[arg-type]
        catalog=None,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        limiter=None,  # type: ignore[arg-type]
    )
    running = asyncio.create_task(
        runtime.run_parts(deps, ["late"], stop, serving=finish_after_stop(0.2))
    )
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(running, 10)
    assert [e.id for e in broker.published] == [e.id for e in late]
    assert len(late) == 2
    assert all(row.sent_at for row in (await _rows(sessionmaker)).values())


async def test_the_sent_stamp_is_one_statement_that_commits_by_itself(
    engine: AsyncEngine, sessionmaker: Sessionmaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stamp of published rows is a transaction of one statement: on PostgreSQL it
    commits by itself, with no BEGIN or COMMIT."""
    async with unit_of_work(sessionmaker) as session:
        added = [Envelope.wrap(_canceled(f"job-{n}")) for n in range(3)]
        await outbox.add_many(session, added)
    publisher = OutboxPublisher(sessionmaker, RecordingBroker())  # type: ignore[arg-type]
    publisher._published = [envelope.id for envelope in added[:2]]
    begins = count_begins(monkeypatch)

    await publisher._stamp()

    stamped = len(begins)
    rows = await _rows(sessionmaker)
    assert [rows[envelope.id].sent_at is not None for envelope in added] == [True, True, False]
    if engine.dialect.name == "postgresql":
        assert stamped == 0
