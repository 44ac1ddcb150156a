"""The embedded database's connection: SQLite in the event loop's thread, never holding
the loop while another connection has the write lock."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import URL, make_url, text

from aigen.db import sqlite
from aigen.db.session import create_engine, create_sessionmaker, unit_of_work


def _url(path: Path) -> URL:
    return make_url(f"sqlite+aiosqlite:///{path}")


def _other_connection(path: Path) -> sqlite3.Connection:
    """A connection of its own to a file in WAL mode, as aigen's database is."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("CREATE TABLE notes (body TEXT)")
    return other


@asynccontextmanager
async def _beside_a_writer(
    path: Path, url: URL | None = None, lock_timeout: float = 10
) -> AsyncIterator[tuple[sqlite3.Connection, sqlite.LoopConnection]]:
    """Another connection that holds the write lock, and one of ours to the same file."""
    other = _other_connection(path)
    other.execute("BEGIN IMMEDIATE")
    connection = await sqlite.connector(url or _url(path), lock_timeout)()
    try:
        yield other, connection
    finally:
        await asyncio.wait_for(connection.close(), 5)
        other.close()


async def test_statements_run_in_the_loops_own_thread(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    try:
        async with engine.connect() as connection:
            raw = await connection.get_raw_connection()
            await raw.driver_connection.create_function("thread_ident", 0, threading.get_ident)
            ident = (await connection.execute(text("SELECT thread_ident()"))).scalar_one()
        assert ident == threading.get_ident()
    finally:
        await engine.dispose()


async def test_a_writer_elsewhere_makes_a_transaction_wait_while_the_loop_runs_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    sessionmaker = create_sessionmaker(engine)
    # Another connection to the file takes the write lock, as another process would.
    other = _other_connection(path)
    other.execute("BEGIN IMMEDIATE")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def write() -> None:
        async with unit_of_work(sessionmaker) as session:
            await session.execute(text("INSERT INTO notes VALUES ('ours')"))

    ticker = asyncio.create_task(tick())
    writing = asyncio.create_task(write())
    try:
        await asyncio.sleep(0.3)
        assert not writing.done()  # waiting for the lock …
        assert ticks >= 5  # … in a thread, so the loop went on meanwhile
        other.execute("INSERT INTO notes VALUES ('theirs')")
        other.execute("COMMIT")
        await asyncio.wait_for(writing, 10)
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT body FROM notes"))).scalars().all()
        assert sorted(rows) == ["ours", "theirs"]
    finally:
        ticker.cancel()
        other.close()
        await engine.dispose()


async def test_a_lock_held_past_the_timeout_fails_the_call_and_the_next_call_does_not_wait(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.db"
    # The URL's own timeout replaces the default, as SQLAlchemy's dialect reads it.
    url = make_url(f"sqlite+aiosqlite:///{path}?timeout=0.2")
    async with _beside_a_writer(path, url, lock_timeout=30) as (_other, connection):
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError) as raised:
            await connection.execute("BEGIN IMMEDIATE")
        assert raised.value.sqlite_errorcode == sqlite3.SQLITE_BUSY
        assert 0.2 <= time.monotonic() - started < 10
        cursor = await connection.execute("PRAGMA busy_timeout")
        assert await cursor.fetchall() == [(0,)]  # the loop's own calls still fail at once


async def test_executemany_of_a_generator_that_met_the_lock_writes_every_row(
    tmp_path: Path,
) -> None:
    async with _beside_a_writer(tmp_path / "a.db") as (other, connection):
        asyncio.get_running_loop().call_later(0.1, other.execute, "COMMIT")
        cursor = connection.cursor()
        await cursor.executemany("INSERT INTO notes VALUES (?)", ((str(n),) for n in range(3)))
        rows = await (await connection.execute("SELECT body FROM notes")).fetchall()
        assert sorted(rows) == [("0",), ("1",), ("2",)]


async def _cancel_a_call_waiting_for_the_lock(connection: sqlite.LoopConnection) -> None:
    """Start a call that meets the other writer's lock, and cancel its caller while the
    call waits in its thread."""
    waiting = asyncio.create_task(connection.execute("BEGIN IMMEDIATE"))
    await asyncio.sleep(0.2)
    waiting.cancel()


async def test_a_call_cancelled_while_it_waits_for_the_lock_keeps_the_connection_until_it_ends(
    tmp_path: Path,
) -> None:
    async with _beside_a_writer(tmp_path / "a.db") as (other, connection):
        await _cancel_a_call_waiting_for_the_lock(connection)
        # The thread still waits in SQLite on this connection: the next call waits for it
        # (without holding the loop), then finds the transaction that call began.
        rolling_back = asyncio.create_task(connection.rollback())
        await asyncio.sleep(0.2)
        assert not rolling_back.done()
        other.execute("COMMIT")
        await asyncio.wait_for(rolling_back, 5)
        cursor = await connection.execute("BEGIN IMMEDIATE")  # the lock is free again
        await cursor.close()
        await connection.rollback()


async def test_a_close_while_a_call_waits_for_the_lock_closes_when_it_ends(
    tmp_path: Path,
) -> None:
    async with _beside_a_writer(tmp_path / "a.db") as (other, connection):
        await _cancel_a_call_waiting_for_the_lock(connection)
        connection.stop()  # SQLAlchemy's forced close: it must not pull the connection away
        assert connection._connection is not None
        other.execute("COMMIT")
        for _ in range(500):
            if connection._connection is None:
                break
            await asyncio.sleep(0.01)
        assert connection._connection is None
        # The transaction the thread began went with the connection: the lock is free.
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
