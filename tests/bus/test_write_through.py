"""With the embedded queue, events go into it in the transaction that adds them.

`outbox.write_through` (what `runtime.run_parts` sets up for a database broker): no relay
runs in these tests, so a message can only reach its consumer's queue directly.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from aigen import runtime
from aigen.bootstrap import Deps
from aigen.bus import outbox
from aigen.bus.database import DatabaseBroker
from aigen.bus.messages import AIGenerationJobRequested, Envelope
from aigen.bus.topology import WORKFLOW
from aigen.config import Settings
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import OutboxMessage, QueueMessage


def requested(number: int) -> Envelope:
    return Envelope.wrap(
        AIGenerationJobRequested(
            job_id=f"job_{number}", account_id="acc_1", model="m", input={"prompt": "x"}
        )
    )


async def test_the_events_are_in_the_queue_once_their_transaction_commits(
    sessionmaker: Sessionmaker,
) -> None:
    broker = DatabaseBroker(sessionmaker, poll_interval=3600.0)
    handled: list[str] = []
    done = asyncio.Event()

    async def handler(envelope: Envelope) -> None:
        handled.append(envelope.job_id or "")
        if len(handled) == 2:
            done.set()

    stop = asyncio.Event()
    consuming = asyncio.create_task(broker.consume(WORKFLOW, handler, stop=stop, prefetch=8))
    await asyncio.sleep(0.2)  # its first claim found nothing; only a wake-up brings more
    with outbox.write_through(sessionmaker, broker):
        async with unit_of_work(sessionmaker) as session:
            await outbox.add_many(session, [requested(1), requested(2)])
        await asyncio.wait_for(done.wait(), 5)
    stop.set()
    await consuming

    assert sorted(handled) == ["job_1", "job_2"]
    async with sessionmaker() as session:
        rows = (await session.scalars(select(OutboxMessage))).all()
    # Kept for the event feed, and already sent: a relay has nothing to publish again.
    assert len(rows) == 2
    assert all(row.sent_at is not None for row in rows)


async def test_a_rolled_back_transaction_leaves_no_event_anywhere(
    sessionmaker: Sessionmaker,
) -> None:
    async def failing_change() -> None:
        async with unit_of_work(sessionmaker) as session:
            await outbox.add_many(session, [requested(1)])
            raise RuntimeError("the change fails after its event was added")

    queue = DatabaseBroker(sessionmaker)
    with outbox.write_through(sessionmaker, queue), pytest.raises(RuntimeError):
        await failing_change()
    async with sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(QueueMessage)) == 0
        assert await session.scalar(select(func.count()).select_from(OutboxMessage)) == 0


async def test_outside_the_block_the_events_wait_for_the_relay(
    sessionmaker: Sessionmaker,
) -> None:
    broker = DatabaseBroker(sessionmaker)
    with outbox.write_through(sessionmaker, broker):
        pass
    async with unit_of_work(sessionmaker) as session:
        await outbox.add_many(session, [requested(1)])
    async with sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(QueueMessage)) == 0
        [row] = (await session.scalars(select(OutboxMessage))).all()
    assert row.sent_at is None
    # The relay then moves it, as for every event added without a queue at hand.
    assert await outbox.Relay(sessionmaker, broker).run_once() == 1
    async with sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(QueueMessage)) == 1


async def test_the_parts_of_a_process_on_the_embedded_queue_write_through(
    engine: AsyncEngine, sessionmaker: Sessionmaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop = asyncio.Event()

    async def part(_deps: object, until: asyncio.Event) -> None:
        async with unit_of_work(sessionmaker) as session:
            await outbox.add_many(session, [requested(1)])
        await until.wait()

    monkeypatch.setitem(runtime.BACKGROUND, "adds", part)
    deps = Deps(
        settings=Settings(),
        secret="s" * 32,
        engine=engine,
        sessionmaker=sessionmaker,
        broker=DatabaseBroker(sessionmaker),
        catalog=None,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        limiter=None,  # type: ignore[arg-type]
    )
    running = asyncio.create_task(runtime.run_parts(deps, ["adds"], stop))  # and no relay
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(running, 10)

    async with sessionmaker() as session:
        [message] = (await session.scalars(select(QueueMessage))).all()
        [row] = (await session.scalars(select(OutboxMessage))).all()
    assert (message.queue, message.event_id) == (WORKFLOW, row.event_id)
    assert row.sent_at is not None
    # Attached for the process's run only.
    assert "aigen.outbox.write_through" not in sessionmaker.kw.get("info", {})
