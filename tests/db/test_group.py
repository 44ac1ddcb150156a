"""Group commit for consumers: shared transactions, and one unit's error stays its own."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from aigen.bus import inbox
from aigen.db import driver
from aigen.db.base import table
from aigen.db.group import GroupCommit
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import InboxMessage
from tests.fixtures.asyncpg_calls import count_begins

# Built once, as the hot statements are (the driver keeps a plan per statement object).
_TABLE = table(InboxMessage)
_ADD = insert(_TABLE)


async def _recorded(sessionmaker: Sessionmaker) -> set[str]:
    async with sessionmaker() as session:
        return set((await session.scalars(select(InboxMessage.event_id))).all())


def _count_commits(engine: AsyncEngine) -> list[int]:
    commits: list[int] = []
    event.listen(engine.sync_engine, "commit", lambda *_: commits.append(1))
    return commits


async def test_units_that_arrive_together_share_transactions(
    engine: AsyncEngine, sessionmaker: Sessionmaker
) -> None:
    commits = _count_commits(engine)
    group = GroupCommit(sessionmaker)

    def record(event_id: str) -> Any:
        return lambda session: inbox.first_time(session, "test", event_id)

    results = await asyncio.gather(*(group.run(record(f"evt_{n}")) for n in range(40)))
    # A redelivered event in a later batch finds its row: the results are the units' own.
    again = await group.run(record("evt_7"))

    assert results == [True] * 40
    assert again is False
    assert await _recorded(sessionmaker) == {f"evt_{n}" for n in range(40)}
    # The first runs alone; those that queued meanwhile go together.
    assert 2 <= len(commits) <= 4


async def test_a_failing_unit_fails_alone_and_the_others_commit(
    sessionmaker: Sessionmaker,
) -> None:
    group = GroupCommit(sessionmaker)
    runs: dict[str, int] = {}

    def unit(event_id: str, *, fails: bool = False) -> Any:
        async def work(session: AsyncSession) -> bool:
            runs[event_id] = runs.get(event_id, 0) + 1
            recorded = await inbox.first_time(session, "test", event_id)
            if fails:
                raise ValueError(f"{event_id} is bad")
            return recorded

        return work

    blocker = asyncio.ensure_future(group.run(unit("evt_first")))
    await asyncio.sleep(0)  # the first batch starts; the next three queue behind it
    batch = [
        group.run(unit("evt_a")),
        group.run(unit("evt_bad", fails=True)),
        group.run(unit("evt_b")),
    ]
    results = await asyncio.gather(blocker, *batch, return_exceptions=True)

    assert results[:2] == [True, True]
    assert isinstance(results[2], ValueError)
    assert str(results[2]) == "evt_bad is bad"
    assert results[3] is True
    # The batch stopped at the bad unit and was rolled back; then each unit ran alone
    # (evt_b, behind the bad one, for the first time): nothing of the bad one stays.
    assert runs == {"evt_first": 1, "evt_a": 2, "evt_bad": 2, "evt_b": 1}
    assert await _recorded(sessionmaker) == {"evt_first", "evt_a", "evt_b"}


async def test_an_unreachable_database_fails_the_units_queued_behind(
    sessionmaker: Sessionmaker,
) -> None:
    group = GroupCommit(sessionmaker)
    stuck = asyncio.Event()
    tried: list[str] = []

    def unit(name: str) -> Any:
        async def work(session: AsyncSession) -> None:
            tried.append(name)
            await stuck.wait()  # as a statement timeout would
            raise ConnectionResetError("the database went away")

        return work

    first = asyncio.ensure_future(group.run(unit("first")))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(group.run(unit("second")))
    third = asyncio.ensure_future(group.run(unit("third")))
    await asyncio.sleep(0.05)
    stuck.set()
    results = await asyncio.gather(first, second, third, return_exceptions=True)

    assert all(isinstance(r, ConnectionResetError) for r in results)
    # The two queued behind the first were not tried one timeout later: they failed with it.
    assert tried == ["first"]


async def test_a_cancelled_caller_does_not_stop_the_batch(sessionmaker: Sessionmaker) -> None:
    group = GroupCommit(sessionmaker)
    gate = asyncio.Event()

    async def slow(session: AsyncSession) -> bool:
        await gate.wait()
        return await inbox.first_time(session, "test", "evt_slow")

    caller = asyncio.ensure_future(group.run(slow))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    gate.set()
    # A unit behind it still runs: the batch went on and committed.
    assert await group.run(lambda s: inbox.first_time(s, "test", "evt_next")) is True
    async with sessionmaker() as session:
        count = await session.scalar(select(func.count()).select_from(InboxMessage))
    assert count == 2


async def test_batched_items_of_one_work_go_in_one_call(sessionmaker: Sessionmaker) -> None:
    commits = _count_commits(sessionmaker.kw["bind"])
    group = GroupCommit(sessionmaker)
    calls: list[list[str]] = []

    async def record_all(session: AsyncSession, event_ids: Sequence[str]) -> list[bool]:
        calls.append(list(event_ids))
        fresh = await inbox.first_time_many(session, "test", event_ids)
        return [event_id in fresh for event_id in event_ids]

    gate = asyncio.Event()

    async def blocker(session: AsyncSession) -> None:
        await gate.wait()

    first = asyncio.ensure_future(group.run(blocker))
    await asyncio.sleep(0)  # the first batch starts; the rest queue behind it
    queued = [group.run_batched(record_all, f"evt_{n}", order="b") for n in range(5)] + [
        group.run(lambda s: inbox.first_time(s, "test", "evt_unit"), order="a"),
        # Recorded by the unit that runs before it: its order comes first.
        group.run_batched(record_all, "evt_unit", order="b"),
    ]
    tasks = [asyncio.ensure_future(q) for q in queued]
    await asyncio.sleep(0.05)
    gate.set()
    await first
    results = await asyncio.gather(*tasks)

    assert results == [True] * 5 + [True, False]
    # The plain unit (order "a") ran first, then one call with every batched item.
    assert calls == [["evt_0", "evt_1", "evt_2", "evt_3", "evt_4", "evt_unit"]]
    assert len(commits) == 1  # theirs (the blocker's transaction wrote nothing)
    assert await _recorded(sessionmaker) == {"evt_unit", *(f"evt_{n}" for n in range(5))}


async def test_a_failing_batched_call_runs_each_item_alone(sessionmaker: Sessionmaker) -> None:
    group = GroupCommit(sessionmaker)
    calls: list[list[str]] = []

    async def record_all(session: AsyncSession, event_ids: Sequence[str]) -> list[bool]:
        calls.append(list(event_ids))
        fresh = await inbox.first_time_many(session, "test", event_ids)
        if "evt_bad" in event_ids:
            raise ValueError("evt_bad is bad")
        return [event_id in fresh for event_id in event_ids]

    async def miscounting(session: AsyncSession, event_ids: Sequence[str]) -> list[bool]:
        return []

    gate = asyncio.Event()
    first = asyncio.ensure_future(group.run(lambda s: gate.wait()))
    await asyncio.sleep(0)
    tasks = [
        asyncio.ensure_future(group.run_batched(record_all, name))
        for name in ("evt_a", "evt_bad", "evt_b")
    ]
    wrong = asyncio.ensure_future(group.run_batched(miscounting, "evt_c", order="z"))
    await asyncio.sleep(0.05)
    gate.set()
    await first
    results = await asyncio.gather(*tasks, wrong, return_exceptions=True)

    assert results[0] is True
    assert results[2] is True
    assert isinstance(results[1], ValueError)
    assert isinstance(results[3], RuntimeError)  # a work must give one result per item
    assert calls == [["evt_a", "evt_bad", "evt_b"], ["evt_a"], ["evt_bad"], ["evt_b"]]
    assert await _recorded(sessionmaker) == {"evt_a", "evt_b"}


async def test_a_lingering_group_shares_a_transaction_among_units_that_come_apart(
    sessionmaker: Sessionmaker,
) -> None:
    """Units that arrive a little apart at an idle group: alone each, with no linger;
    in one transaction when the first waits for the others (`linger`)."""
    commits = _count_commits(sessionmaker.kw["bind"])

    async def record_all(session: AsyncSession, event_ids: Sequence[str]) -> list[bool]:
        fresh = await inbox.first_time_many(session, "test", event_ids)
        return [event_id in fresh for event_id in event_ids]

    async def spaced(group: GroupCommit, prefix: str) -> list[bool]:
        tasks = []
        for n in range(3):
            tasks.append(asyncio.ensure_future(group.run_batched(record_all, f"{prefix}_{n}")))
            await asyncio.sleep(0.05)  # each finds the one before it committed, unless it lingers
        return await asyncio.gather(*tasks)

    assert await spaced(GroupCommit(sessionmaker), "evt_eager") == [True] * 3
    eager = len(commits)
    assert await spaced(GroupCommit(sessionmaker, linger=0.3), "evt_lingering") == [True] * 3
    lingering = len(commits) - eager

    assert (eager, lingering) == (3, 1)
    assert await _recorded(sessionmaker) >= {f"evt_lingering_{n}" for n in range(3)}


async def test_a_unit_alone_sends_its_alone_statements_outside_the_transaction(
    engine: AsyncEngine, sessionmaker: Sessionmaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`driver.execute(..., alone=True)`: on PostgreSQL, the statements of a unit that
    runs alone commit by themselves, with no BEGIN or COMMIT, until it sends one that is
    not `alone`: that one begins the transaction, and what follows, `alone` or not, is
    the transaction's and rolls back with it. In a shared transaction every statement is
    the transaction's."""
    async with unit_of_work(sessionmaker) as session:
        await session.execute(select(1))  # (a new engine's first connection asks the server)
    begins = count_begins(monkeypatch)
    group = GroupCommit(sessionmaker)
    row = {"consumer": "test", "processed_at": datetime(2026, 1, 1, tzinfo=UTC)}

    def unit(*event_ids: str, fails: bool = True) -> Any:
        async def work(session: AsyncSession) -> None:
            for event_id in event_ids:
                # (A name in capitals: not `alone`.)
                alone = event_id.islower()
                await driver.execute(session, _ADD, row | {"event_id": event_id}, alone=alone)
                await driver.execute(session, select(_TABLE.c.event_id), {}, alone=alone)
            if fails:
                raise ValueError("after its statements")

        return work

    await group.run(unit("evt_one", fails=False))
    counts = [len(begins)]
    with pytest.raises(ValueError, match="after its statements"):
        await group.run(unit("evt_first", "evt_second"))
    counts.append(len(begins))
    with pytest.raises(ValueError, match="after its statements"):
        await group.run(unit("evt_before", "EVT_BEGINS", "evt_after"))
    counts.append(len(begins))
    gate = asyncio.Event()
    first = asyncio.ensure_future(group.run(lambda session: gate.wait()))
    await asyncio.sleep(0)
    shared = [group.run(unit(f"evt_shared_{n}", fails=False)) for n in range(2)]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(first, *shared)
    counts.append(len(begins))

    shared_ids = {"evt_shared_0", "evt_shared_1"}
    if engine.dialect.name == "postgresql":
        # No BEGIN for the statements alone; one for the unit's statement that is not,
        # which rolled back with the one after it; one for the units that went together.
        assert counts == [0, 0, 1, 2]
        alone = {"evt_one", "evt_first", "evt_second", "evt_before"}
        assert await _recorded(sessionmaker) == {*alone, *shared_ids}
    else:  # SQLite's BEGIN IMMEDIATE goes with the transaction: all is in it
        assert await _recorded(sessionmaker) == {"evt_one", *shared_ids}
