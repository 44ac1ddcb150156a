"""The embedded queue (`database` broker): the messages handled together are acked together."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import pytest
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.bus import database
from aigen.bus.broker import Handler, Retry
from aigen.bus.database import DatabaseBroker
from aigen.bus.messages import AIGenerationJobCanceled, Envelope
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import QueueMessage

QUEUE = "aigen.backend"  # bound to the canceled events


def canceled(number: int) -> Envelope:
    return Envelope.wrap(AIGenerationJobCanceled(job_id=f"job_{number}", account_id="acc_1"))


async def test_messages_handled_together_are_acked_in_one_statement(
    sessionmaker: Sessionmaker,
) -> None:
    broker = DatabaseBroker(sessionmaker)
    await broker.publish([canceled(n) for n in range(8)])
    gate = asyncio.Event()
    handled: list[str] = []
    stop = asyncio.Event()

    async def handler(envelope: Envelope) -> None:
        handled.append(envelope.job_id)
        await gate.wait()  # they all end together

    with _counting(sessionmaker, _is_delete) as deletes:
        consuming = asyncio.create_task(broker.consume(QUEUE, handler, stop=stop, prefetch=8))
        await _until(lambda: len(handled) == 8, seconds=2)
        gate.set()
        await _until_empty(sessionmaker, seconds=2)
        stop.set()
        await consuming

    assert sorted(handled) == sorted(f"job_{n}" for n in range(8))
    assert len(deletes) == 1


async def test_the_acks_of_messages_handled_within_the_gap_share_one_statement(
    sessionmaker: Sessionmaker,
) -> None:
    broker = DatabaseBroker(sessionmaker, ack_gap=2.0)
    handled, handler = _recorder()
    with _counting(sessionmaker, _is_delete) as deletes:
        async with _consuming(broker, handler):
            for n in range(4):  # one after another, a little apart
                await broker.publish([canceled(n)])
                await asyncio.sleep(0.05)
            await _until(lambda: len(handled) == 4, seconds=2)
            assert deletes == []
            # Meanwhile their rows stay leased: no claim hands them out again.
            assert await DatabaseBroker(sessionmaker)._claim(QUEUE, 10) == []
            await _until_empty(sessionmaker, seconds=5)
    assert len(deletes) == 1
    assert handled == [f"job_{n}" for n in range(4)]


async def test_a_stopping_consumer_deletes_what_it_handled_before_it_returns(
    sessionmaker: Sessionmaker,
) -> None:
    broker = DatabaseBroker(sessionmaker, ack_gap=60.0)
    handled, handler = _recorder()
    async with _consuming(broker, handler):
        await broker.publish([canceled(1), canceled(2)])
        await _until(lambda: len(handled) == 2, seconds=2)
    # The consumer has returned, a minute before the gap would have ended.
    async with sessionmaker() as session:
        assert await database.depth(session, QUEUE) == 0


async def test_an_ack_right_after_another_consumer_stopped_is_still_made(
    sessionmaker: Sessionmaker,
) -> None:
    # The consumers of one process share the acks: one stopping (which stops the timer)
    # must not strand the ack another makes at that very moment.
    broker = DatabaseBroker(sessionmaker, ack_gap=0.5)
    await broker.publish([canceled(1), canceled(2)])
    first, second = await broker._claim(QUEUE, 2)
    broker._acks.add(first)
    await asyncio.sleep(0)  # the timer waits out the gap
    await broker._acks.drain()
    broker._acks.add(second)
    await _until_empty(sessionmaker, seconds=3)


async def test_acks_that_fail_are_tried_again(
    sessionmaker: Sessionmaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = DatabaseBroker(sessionmaker, ack_gap=0.05)
    failures = [ConnectionError("the database is away")]
    delete = database._delete_leased

    async def flaky(session: AsyncSession, leases: Sequence[database._Lease]) -> None:
        if failures:
            raise failures.pop()
        await delete(session, leases)

    monkeypatch.setattr(database, "_delete_leased", flaky)
    handled, handler = _recorder()
    async with _consuming(broker, handler):
        await broker.publish([canceled(1)])
        await _until_empty(sessionmaker, seconds=5)  # not left to the stop
    assert failures == []
    assert handled == ["job_1"]


async def test_an_ack_under_a_lease_taken_since_deletes_nothing(
    sessionmaker: Sessionmaker,
) -> None:
    broker = DatabaseBroker(sessionmaker)
    await broker.publish([canceled(1), canceled(2)])
    async with sessionmaker() as session:
        rows = (
            await session.scalars(select(QueueMessage).where(QueueMessage.queue == QUEUE))
        ).all()
    held, taken = sorted(row.id for row in rows)
    leases = [
        database._Lease(held, "token-held", 1, ""),
        # Its lease ran out and another consumer holds it now, under its own token.
        database._Lease(taken, "token-stale", 1, ""),
    ]
    async with unit_of_work(sessionmaker) as session:
        await session.execute(
            QueueMessage.__table__.update()
            .where(QueueMessage.id == held)
            .values(lease_token="token-held")
        )
        await session.execute(
            QueueMessage.__table__.update()
            .where(QueueMessage.id == taken)
            .values(lease_token="token-new")
        )
    async with unit_of_work(sessionmaker) as session:
        await database._delete_leased(session, leases)
    async with sessionmaker() as session:
        left = (
            await session.scalars(select(QueueMessage.id).where(QueueMessage.queue == QUEUE))
        ).all()
    assert list(left) == [taken]


async def test_an_idle_consumer_asks_its_queue_less_often_and_still_finds_what_comes(
    sessionmaker: Sessionmaker,
) -> None:
    broker = DatabaseBroker(sessionmaker, poll_interval=0.01, idle_poll_max=0.2)
    handled: list[str] = []

    async def handler(envelope: Envelope) -> None:
        handled.append(envelope.job_id)

    async with _consuming(broker, handler):
        with _counting_claims(sessionmaker) as claims:
            await asyncio.sleep(1.5)
        # Every 10 ms would be about 150 claims; backing off to 200 ms, about a dozen.
        assert 5 <= len(claims) <= 30
        # Another process's publish (another broker: no in-process wake-up) is found by
        # the next poll, within the longest wait.
        await DatabaseBroker(sessionmaker).publish([canceled(1)])
        await _until(lambda: handled == ["job_1"], seconds=5)


async def test_a_retry_wakes_the_consumer_when_it_is_due_not_at_its_next_poll(
    sessionmaker: Sessionmaker,
) -> None:
    broker = DatabaseBroker(sessionmaker, poll_interval=5.0)
    seen: list[float] = []

    async def handler(_envelope: Envelope) -> None:
        seen.append(time.monotonic())
        if len(seen) == 1:
            raise Retry(0.5, "not yet")

    async with _consuming(broker, handler):
        await broker.publish([canceled(1)])
        await _until(lambda: len(seen) == 2, seconds=4)
        assert 0.5 <= seen[1] - seen[0] < 2.0


async def test_a_publish_wakes_the_consumer_once_it_is_committed(
    sessionmaker: Sessionmaker,
) -> None:
    broker = DatabaseBroker(sessionmaker, poll_interval=5.0)
    handled: list[str] = []

    async def handler(envelope: Envelope) -> None:
        handled.append(envelope.job_id)

    async with _consuming(broker, handler):
        await asyncio.sleep(0.2)  # its first claim found nothing: it waits for 5 s now
        # A consumer woken before the commit (on PostgreSQL, which does not queue the
        # claim behind the publishing transaction) would find nothing, then wait 5 s.
        async with unit_of_work(sessionmaker) as session:
            await broker.publish_in(session, [canceled(1)])
            await asyncio.sleep(0.3)
        await _until(lambda: handled == ["job_1"], seconds=2)


async def test_a_claim_that_was_not_full_is_not_followed_by_another_at_once(
    sessionmaker: Sessionmaker,
) -> None:
    # Each claim is a write transaction: after one that took fewer messages than it
    # asked for, the queue was empty, and the consumer waits for a wake-up or its poll.
    broker = DatabaseBroker(sessionmaker, poll_interval=5.0)
    await broker.publish([canceled(1), canceled(2)])  # before it consumes: no hand-over
    handled, handler = _recorder()

    with _counting_claims(sessionmaker) as claims:
        async with _consuming(broker, handler):
            await _until(lambda: len(handled) == 2, seconds=2)
            await asyncio.sleep(0.3)
    assert len(claims) == 1


async def test_a_message_published_in_its_consumers_process_is_handed_over_without_a_claim(
    sessionmaker: Sessionmaker,
) -> None:
    broker = DatabaseBroker(sessionmaker, poll_interval=5.0)
    handled, handler = _recorder()

    async with _consuming(broker, handler):
        await asyncio.sleep(0.2)  # its first claim found nothing: it waits for 5 s now
        with _counting_claims(sessionmaker) as claims:
            await broker.publish([canceled(1), canceled(2)])
            await _until(lambda: len(handled) == 2, seconds=2)
            await _until_empty(sessionmaker, seconds=2)  # and acked
    assert sorted(handled) == ["job_1", "job_2"]
    assert claims == []
    async with sessionmaker() as session:
        assert await database.depth(session, QUEUE) == 0


async def test_a_rolled_back_hand_over_hands_nothing_and_gives_its_slot_back(
    sessionmaker: Sessionmaker,
) -> None:
    broker = DatabaseBroker(sessionmaker, poll_interval=5.0)
    handled, handler = _recorder()

    stop = asyncio.Event()
    consuming = asyncio.create_task(broker.consume(QUEUE, handler, stop=stop, prefetch=1))
    await asyncio.sleep(0.2)
    with _counting_claims(sessionmaker) as claims:
        with contextlib.suppress(RuntimeError):
            async with unit_of_work(sessionmaker) as session:
                await broker.publish_in(session, [canceled(1)])  # takes the one slot
                raise RuntimeError("the change it announces fails")
        # Had the slot stayed taken, this one would wait for a claim (5 s away).
        await broker.publish([canceled(2)])
        await _until(lambda: handled == ["job_2"], seconds=2)
    stop.set()
    await consuming
    assert claims == []
    async with sessionmaker() as session:
        assert await database.depth(session, QUEUE) == 0


async def test_with_messages_waiting_for_a_claim_new_ones_queue_behind_them(
    sessionmaker: Sessionmaker,
) -> None:
    # A consumer whose freed slots always went to the newest message would leave the
    # oldest waiting for a lull; under load, a hand-over must not overtake the table.
    broker = DatabaseBroker(sessionmaker)
    hand = broker._hands[QUEUE] = database._Hand(1, set())
    second, third = canceled(2), canceled(3)
    await broker.publish([canceled(1)])  # handed over: the one slot is taken
    await broker.publish([second])  # no room: it waits in the table for a claim
    assert len(hand.take()) == 1  # (as if the consumer had started it and finished)
    await broker.publish([third])  # room again, but it queues behind the second
    assert hand.take() == []
    async with sessionmaker() as session:
        waiting = (
            await session.scalars(
                select(QueueMessage.event_id)
                .where(QueueMessage.queue == QUEUE, QueueMessage.lease_token.is_(None))
                .order_by(QueueMessage.id)
            )
        ).all()
    assert list(waiting) == [second.id, third.id]


async def test_a_hand_over_its_consumer_never_took_is_claimed_once_its_lease_runs_out(
    sessionmaker: Sessionmaker,
) -> None:
    # As if the process died between the commit and the handling: the row is leased to
    # a consumer that is gone, and another process's consumer takes it after the lease.
    gone = DatabaseBroker(sessionmaker, lease_seconds=0.5)
    gone._hands[QUEUE] = database._Hand(8, set())
    await gone.publish([canceled(1)])
    assert [lease.deliveries for lease in gone._hands[QUEUE].handed] == [1]
    other = DatabaseBroker(sessionmaker, poll_interval=0.05, idle_poll_max=0.1)
    seen: list[tuple[str, float]] = []
    published = time.monotonic()

    async def handler(envelope: Envelope) -> None:
        seen.append((envelope.job_id or "", time.monotonic() - published))

    async with _consuming(other, handler):
        await _until(lambda: len(seen) == 1, seconds=5)
    [(job, after)] = seen
    assert job == "job_1"
    assert after >= 0.4  # not before the lease ran out
    async with sessionmaker() as session:
        assert await database.depth(session, QUEUE) == 0


async def test_a_backlog_larger_than_the_prefetch_is_claimed_batch_after_batch(
    sessionmaker: Sessionmaker,
) -> None:
    broker = DatabaseBroker(sessionmaker, poll_interval=5.0)
    await broker.publish([canceled(n) for n in range(20)])
    handled: list[str] = []

    async def handler(envelope: Envelope) -> None:
        handled.append(envelope.job_id)

    # Full claims of 8 are followed by the next at once, not after the 5 s poll.
    async with _consuming(broker, handler):
        await _until(lambda: len(handled) == 20, seconds=3)
    assert sorted(handled) == sorted(f"job_{n}" for n in range(20))


def _recorder() -> tuple[list[str], Handler]:
    """A handler that records the job ids of the events it is given, and its record."""
    handled: list[str] = []

    async def handler(envelope: Envelope) -> None:
        handled.append(envelope.job_id or "")

    return handled, handler


@asynccontextmanager
async def _consuming(broker: DatabaseBroker, handler: Handler) -> AsyncIterator[None]:
    """`broker` consuming `QUEUE` with `handler` for the duration of the block."""
    stop = asyncio.Event()
    consuming = asyncio.create_task(broker.consume(QUEUE, handler, stop=stop, prefetch=8))
    try:
        yield
    finally:
        stop.set()
        await consuming


@contextmanager
def _counting(sessionmaker: Sessionmaker, match: Callable[[str], bool]) -> Iterator[list[str]]:
    """The statements that `match` made meanwhile."""
    made: list[str] = []
    engine = sessionmaker.kw["bind"].sync_engine

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if match(statement):
            made.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield made
    finally:
        event.remove(engine, "before_cursor_execute", count)


def _counting_claims(sessionmaker: Sessionmaker) -> contextlib.AbstractContextManager[list[str]]:
    """The claims (`UPDATE … WHERE id IN (SELECT …)`) made meanwhile."""
    return _counting(
        sessionmaker, lambda s: s.startswith("UPDATE queue_messages") and "IN (SELECT" in s
    )


def _is_delete(statement: str) -> bool:
    return statement.lstrip().upper().startswith("DELETE")


async def _until_empty(sessionmaker: Sessionmaker, *, seconds: float) -> None:
    """Until the queue holds no row, handled or not."""
    deadline = time.monotonic() + seconds
    while True:
        async with sessionmaker() as session:
            if await database.depth(session, QUEUE) == 0:
                return
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


async def _until(condition: Callable[[], bool], *, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.005)
