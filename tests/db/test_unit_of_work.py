"""`unit_of_work`: one transaction, and its connection back in the pool however it ends."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from aigen.db import driver
from aigen.db.base import table
from aigen.db.session import Sessionmaker, _close, unit_of_work
from aigen.models import InboxMessage

_ADD = table(InboxMessage).insert()


def _row(event_id: str) -> dict[str, str]:
    return {"consumer": "test", "event_id": event_id}


async def _recorded(sessionmaker: Sessionmaker) -> list[str]:
    async with sessionmaker() as session:
        return list((await session.scalars(select(InboxMessage.event_id))).all())


def _checked_out(engine: AsyncEngine) -> int:
    return int(engine.sync_engine.pool.checkedout())  # type: ignore[attr-defined]


async def test_it_commits_when_the_block_ends_and_rolls_back_when_it_raises(
    engine: AsyncEngine, sessionmaker: Sessionmaker
) -> None:
    async def failing() -> None:
        async with unit_of_work(sessionmaker) as session:
            await driver.execute(session, _ADD, _row("evt_2"))
            raise LookupError

    async with unit_of_work(sessionmaker) as session:
        await driver.execute(session, _ADD, _row("evt_1"))
    with pytest.raises(LookupError):
        await failing()

    assert await _recorded(sessionmaker) == ["evt_1"]
    assert _checked_out(engine) == 0


async def test_a_cancelled_block_rolls_back_and_gives_its_connection_back(
    engine: AsyncEngine, sessionmaker: Sessionmaker
) -> None:
    inside = asyncio.Event()

    async def unit() -> None:
        async with unit_of_work(sessionmaker) as session:
            await driver.execute(session, _ADD, _row("evt_1"))
            inside.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(unit())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert _checked_out(engine) == 0
    assert await _recorded(sessionmaker) == []
    async with unit_of_work(sessionmaker) as session:  # the pool's connections still work
        await driver.execute(session, _ADD, _row("evt_2"))
    assert await _recorded(sessionmaker) == ["evt_2"]


async def test_closing_a_transaction_cut_short_finishes_though_cancelled(
    engine: AsyncEngine, sessionmaker: Sessionmaker
) -> None:
    # A transaction still open at the close (its rollback was itself cancelled, say): the
    # close rolls it back to the end even when its caller is cancelled meanwhile.
    session = sessionmaker()
    await session.begin()
    await driver.execute(session, _ADD, _row("evt_1"))
    closing = asyncio.create_task(_close(session))
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing

    assert not session.in_transaction()
    assert _checked_out(engine) == 0
    assert await _recorded(sessionmaker) == []
