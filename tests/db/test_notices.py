"""Notices after a commit (`aigen.db.notices`): heard at once by this process's listeners,
through PostgreSQL's NOTIFY by other processes', and never for a rollback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import text

from aigen.db import notices
from aigen.db.session import Sessionmaker, unit_of_work

CHANNEL = "aigen_test_notices"
POSTGRES_ONLY = pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)


@asynccontextmanager
async def listening(sessionmaker: Sessionmaker) -> AsyncIterator[notices.Listener]:
    listener = notices.Listener(CHANNEL, sessionmaker)
    stop = asyncio.Event()
    running = asyncio.create_task(listener.run(stop))
    try:
        await _until(lambda: listener.hearing)
        yield listener
    finally:
        stop.set()
        await running


async def _until(condition: object, timeout: float = 10.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_a_commit_wakes_the_watches_of_its_items(sessionmaker: Sessionmaker) -> None:
    async with listening(sessionmaker) as listener:
        with listener.watch("job-1") as one, listener.watch("job-2") as two:
            async with unit_of_work(sessionmaker) as session:
                notices.after_commit(session, CHANNEL, ["job-1"])
                assert not await one.wait(0)  # not before the commit
            assert await one.wait(5)
            assert not await two.wait(0.05)


async def test_a_rollback_tells_nothing(sessionmaker: Sessionmaker) -> None:
    async with listening(sessionmaker) as listener:
        with listener.watch("job-1") as watch:
            with contextlib.suppress(RuntimeError):
                async with unit_of_work(sessionmaker) as session:
                    notices.after_commit(session, CHANNEL, ["job-1"])
                    raise RuntimeError("rolled back")
            assert not await watch.wait(0.3)


async def test_a_watch_begun_after_its_notice_starts_heard(sessionmaker: Sessionmaker) -> None:
    async with listening(sessionmaker) as listener:
        async with unit_of_work(sessionmaker) as session:
            notices.after_commit(session, CHANNEL, ["job-1"])
        await asyncio.sleep(0.3)  # the notice through PostgreSQL too, if any
        with listener.watch("job-1") as watch:
            assert await watch.wait(0)
        with listener.watch("job-other") as other:
            assert not await other.wait(0)


async def test_old_notices_are_forgotten(sessionmaker: Sessionmaker) -> None:
    listener = notices.Listener(CHANNEL, sessionmaker, remember_seconds=0.05)
    listener.heard(["job-1"])
    await asyncio.sleep(0.1)
    with listener.watch("job-1") as watch:
        assert not await watch.wait(0)


@POSTGRES_ONLY
async def test_other_processes_hear_the_items_after_the_commit(
    sessionmaker: Sessionmaker, database_url: str
) -> None:
    heard: asyncio.Queue[str] = asyncio.Queue()
    dsn = database_url.replace("postgresql+asyncpg", "postgresql")
    other = await asyncpg.connect(dsn)
    try:
        await other.add_listener(CHANNEL, lambda *args: heard.put_nowait(args[-1]))
        async with unit_of_work(sessionmaker) as session:
            notices.after_commit(session, CHANNEL, ["job-2", "job-1"])
            notices.after_commit(session, CHANNEL, ["job-1"])
            await session.flush()
            await asyncio.sleep(0.2)
            assert heard.empty()  # nothing before the commit
        payload = await asyncio.wait_for(heard.get(), 5)
        assert payload == "job-1,job-2"
    finally:
        await other.close()


@POSTGRES_ONLY
async def test_a_listener_hears_other_processes_and_listens_again_when_cut_off(
    sessionmaker: Sessionmaker,
) -> None:
    async with listening(sessionmaker) as listener:
        with listener.watch("job-9") as watch:
            cut_off = await _listening_backends(sessionmaker)
            async with unit_of_work(sessionmaker) as session:
                # The server ends the listening connection, as a restart would.
                await session.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = :pid"),
                    {"pid": cut_off[0]},
                )
            async with asyncio.timeout(10):
                while await _listening_backends(sessionmaker) in ([], cut_off):
                    await asyncio.sleep(0.05)
            assert listener.hearing
            async with sessionmaker() as session:
                # As another process would: NOTIFY alone, with no commit of this one's.
                await session.execute(text(f"SELECT pg_notify('{CHANNEL}', 'job-9')"))
                await session.commit()
            assert await watch.wait(5)


async def _listening_backends(sessionmaker: Sessionmaker) -> list[int]:
    async with sessionmaker() as session:
        rows = await session.execute(
            text(
                "SELECT pid FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND datname = current_database()"
            )
        )
        return [pid for (pid,) in rows]


def test_payloads_stay_under_postgres_limit() -> None:
    items = [f"job_{number:026d}" for number in range(1000)]
    payloads = list(notices.payloads(items))
    assert len(payloads) > 1
    assert all(len(payload) < 8000 for payload in payloads)
    assert sorted(item for payload in payloads for item in payload.split(",")) == items


def test_a_notice_of_no_item_is_one_empty_payload() -> None:
    # The outbox's "rows were added": a notice all the same.
    assert list(notices.payloads([])) == [""]
