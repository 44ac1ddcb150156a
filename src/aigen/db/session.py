"""Engine and session factory; SQLite is tuned so one process can run every part at once."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, exc, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.util import await_only

from aigen.db import sqlite
from aigen.db.driver import ALONE

Sessionmaker = async_sessionmaker[AsyncSession]


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    connect_timeout: float | None = None,
    pool_timeout: float = 30.0,
    command_timeout: float | None = None,
) -> AsyncEngine:
    """An engine for `url`; the timeouts apply to PostgreSQL (asyncpg) only."""
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url, async_creator=sqlite.connector(make_url(url), SQLITE_LOCK_TIMEOUT_SECONDS)
        )
        _tune_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {}
    asyncpg = url.partition("://")[0].endswith("+asyncpg")
    if asyncpg:
        if connect_timeout is not None:
            connect_args["timeout"] = connect_timeout
        if command_timeout is not None:
            connect_args["command_timeout"] = command_timeout
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=pool_timeout,
        connect_args=connect_args,
    )
    if asyncpg:
        _ping_idle_connections(engine)
    return engine


# A connection back in the pool for less than this is taken to be alive without a ping.
PING_AFTER_IDLE_SECONDS = 1.0
_RETURNED_AT = "aigen.returned_at"


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """Test a pooled connection before use, in one round trip and only when in doubt.

    SQLAlchemy's own pre-ping (asyncpg) wraps a `;` in BEGIN … ROLLBACK, for PgBouncer's
    transaction mode: three round trips before every transaction, the most frequent
    statements on the database. Here a bare `;` does, and only for a connection that
    sat idle for a while: one in use a moment ago (every connection, under load) was
    alive then, and asyncpg itself notices a connection the server has closed since.
    A link that breaks within that second fails its statement instead, as one that
    breaks mid-transaction does; the pool then discards its connections, and the
    caller's retry (a 503 and Retry-After, a redelivered message) finds new ones.
    A failed test makes the pool drop the connection and take another (SQLAlchemy's
    documented "pessimistic" handling, `DisconnectionError` at checkout).
    """
    pool = engine.sync_engine.pool

    @event.listens_for(pool, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_RETURNED_AT] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned_at = record.info.get(_RETURNED_AT)
        if returned_at is None:
            return  # connected just now
        driver = dbapi_connection.driver_connection
        if driver.is_closed():
            raise exc.DisconnectionError("the server closed the connection")
        if time.monotonic() - returned_at < PING_AFTER_IDLE_SECONDS:
            return
        try:
            await_only(driver.fetchrow(";"))
        except Exception as error:
            raise exc.DisconnectionError(f"the connection failed its test: {error!r}") from error


# How long a transaction waits for SQLite's write lock: held by another process
# (`sqlite.LoopConnection`), and in the in-process queue in front of it (`_WriteGate`).
SQLITE_LOCK_TIMEOUT_SECONDS = 30.0


def _tune_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine
    gate = _WriteGate(SQLITE_LOCK_TIMEOUT_SECONDS)

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets readers run beside the one writer. The connection comes without
        # pysqlite's own BEGIN handling (`isolation_level=None`), so that every transaction
        # can start as BEGIN IMMEDIATE below, and it waits for the lock itself (`sqlite`).
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Taking the write lock at BEGIN serialises writers up front: a deferred
        # transaction that reads and then writes could otherwise fail with SQLITE_BUSY,
        # and the read-check-write sequences (credit holds, job claims) stay exact.
        gate.enter(connection.connection.record_info)
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    @event.listens_for(sync_engine.pool, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            gate.leave(record.record_info)


class _WriteGate:
    """This process's transactions queue here, first come first served, before BEGIN
    IMMEDIATE; a transaction leaves when its connection goes back to the pool.

    SQLite makes a writer that finds the lock taken sleep and retry (its busy handler
    sleeps 1, 2, 5 … up to 100 ms between tries), so under load the lock sits free while
    the next writer sleeps: `aigen up` then managed a few dozen transactions a second.
    Queued here, the next transaction starts the moment the last one's connection is
    back. Other processes on the same file still meet SQLite's own lock and busy handler.
    The gate is per event loop (an engine may outlive a loop in tests and scripts).
    """

    KEY = "aigen.write_gate"

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    def enter(self, record_info: dict[str, Any]) -> None:
        if self.KEY in record_info:
            return  # this connection already holds it (a second BEGIN before checkin)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a synchronous caller: SQLite's own lock is the only queue
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        if not await_only(_acquire(lock, self._timeout)):
            raise exc.OperationalError(
                "BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked")
            )
        # No await between the grant and this line: a cancel cannot strand the lock.
        record_info[self.KEY] = lock

    def leave(self, record_info: dict[str, Any]) -> None:
        lock = record_info.pop(self.KEY, None)
        if lock is not None:
            lock.release()


async def _acquire(lock: asyncio.Lock, timeout: float) -> bool:
    # `asyncio.Lock.acquire` hands the lock on if it is cancelled once granted, unlike
    # `wait_for` around it on Python 3.11.
    try:
        async with asyncio.timeout(timeout):
            await lock.acquire()
    except TimeoutError:
        return False
    return True


def create_sessionmaker(engine: AsyncEngine) -> Sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def unit_of_work(
    sessionmaker: Sessionmaker, *, alone: bool = False
) -> AsyncIterator[AsyncSession]:
    """One transaction: committed when the block ends, rolled back when it raises.

    `alone`: the block is one unit of work, sharing the transaction with no other
    (`driver.ALONE`): a statement it sends `alone` may commit by itself (`driver.execute`:
    one round trip where a transaction of it is three)."""
    session = sessionmaker()
    if alone:
        session.info[ALONE] = True
    try:
        async with session.begin():
            yield session
    finally:
        await _close(session)


async def _close(session: AsyncSession) -> None:
    # `async with session` closes in a task of its own, shielded, so that a cancel cannot
    # cut a rollback short: a task and two turns of the loop per transaction, about a
    # tenth of a short one's CPU (BENCHMARKS.md, the seventeenth session). Once the
    # transaction has ended (committed or rolled back), its connection is back in the
    # pool and closing awaits nothing, so no cancel can land in it; only a transaction
    # cut short itself still needs the shielded close.
    if session.in_transaction():
        await session.__aexit__(None, None, None)
    else:
        await session.close()


def is_postgres(session: AsyncSession) -> bool:
    """Row locks (`FOR UPDATE [SKIP LOCKED]`) only where the database has them."""
    bind = session.get_bind()
    return bind.dialect.name == "postgresql"
