"""SQLite for SQLAlchemy's `sqlite+aiosqlite` dialect, called in the event loop's own thread.

aiosqlite runs every call (open a cursor, execute, fetch, close: four per statement) in a
thread of its own and wakes the loop for the answer. On a 2-core machine that hand-off
cost about 300 µs of CPU per statement, where `sqlite3` itself took 2: most of what a
statement cost `aigen up`. SQLite is a library, not a server, so a call that does not wait
for a lock is as short as any Python code the loop runs; this connection makes it there.

The one wait is SQLite's write lock held by another connection (another process on the
same file: a CLI command beside `aigen up`; in this process `_WriteGate` queues writers
first). The connection therefore runs with no busy timeout: a call that meets the lock
fails at once with SQLITE_BUSY, having changed nothing, and is made again in a thread that
waits up to the lock timeout, so the loop is never held while another process writes.

It offers the part of aiosqlite's `Connection` and `Cursor` that SQLAlchemy's adapter
uses (`sqlalchemy.dialects.sqlite.aiosqlite`, `sqlalchemy.connectors.asyncio`), and is
passed to it as `async_creator`. Connections are made with `isolation_level=None`, as
`session._tune_sqlite` wants them, so the adapter's `isolation_level` setter (which
reaches into aiosqlite's own queue) is never needed.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL

T = TypeVar("T")

# The threads that wait for another connection's write lock (and open connections, which
# may wait too): their own, so that a wait never queues behind other work in the loop's
# default executor. A thread is started only when one is needed.
_LOCK_WAITS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="aigen-sqlite-lock")


class LoopConnection:
    """A `sqlite3` connection behind aiosqlite's coroutine interface, with no thread."""

    def __init__(self, connection: sqlite3.Connection, lock_timeout: float) -> None:
        # The adapter reads `_connection` to tell an open connection from a closed one,
        # as aiosqlite keeps it.
        self._connection: sqlite3.Connection | None = connection
        self._lock_timeout_ms = int(lock_timeout * 1000)
        # The call waiting for the lock in a thread, if any. A caller cancelled meanwhile
        # stops waiting, but the thread still has the connection until SQLite answers:
        # the next call, or the close, waits for it first.
        self._in_thread: Future[Any] | None = None

    @property
    def _sqlite(self) -> sqlite3.Connection:
        if self._connection is None:
            raise ValueError("Connection closed")  # aiosqlite's words; the adapter maps them
        return self._connection

    @property
    def isolation_level(self) -> str | None:
        return self._sqlite.isolation_level

    def cursor(self) -> LoopCursor:
        return LoopCursor(self, self._sqlite.cursor())

    async def execute(self, sql: str, parameters: Any = ()) -> LoopCursor:
        cursor = self.cursor()
        await cursor.execute(sql, parameters)
        return cursor

    async def commit(self) -> None:
        await self.call(self._sqlite.commit)

    async def rollback(self) -> None:
        await self.call(self._sqlite.rollback)

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._sqlite.create_function(*args, **kwargs)

    async def close(self) -> None:
        await self._thread_done()
        self.stop()

    def stop(self) -> None:
        """Close now (SQLAlchemy's forced `terminate`), or when the thread's call ends."""
        pending = self._in_thread
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _: self.stop())
            return
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` here; in a thread that waits for the lock if it is taken."""
        if self._in_thread is not None:
            await self._thread_done()
        try:
            return function(*args)
        except sqlite3.OperationalError as error:
            # The primary code: SQLITE_BUSY_RECOVERY and the like are busy too.
            if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                raise
        # SQLITE_BUSY means the call changed nothing, so it can be made again. The
        # connection is this caller's alone until it returns (SQLAlchemy awaits each call),
        # so the thread may use it meanwhile.
        pending = _LOCK_WAITS.submit(self._waiting_for_lock, function, args)
        self._in_thread = pending
        result = await asyncio.wrap_future(pending)
        self._in_thread = None
        return result

    async def _thread_done(self) -> None:
        pending = self._in_thread
        if pending is not None and not pending.done():
            # Its outcome was its caller's; this one only needs the connection back.
            await asyncio.wait([asyncio.wrap_future(pending)])
        self._in_thread = None

    def _waiting_for_lock(self, function: Callable[..., T], args: Sequence[Any]) -> T:
        sqlite = self._sqlite
        sqlite.execute(f"PRAGMA busy_timeout={self._lock_timeout_ms}")
        try:
            return function(*args)
        finally:
            sqlite.execute("PRAGMA busy_timeout=0")


class LoopCursor:
    """aiosqlite's `Cursor` over a `sqlite3` cursor."""

    def __init__(self, connection: LoopConnection, cursor: sqlite3.Cursor) -> None:
        self._connection = connection
        self._cursor = cursor

    async def __aenter__(self) -> LoopCursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._cursor.close()

    async def execute(self, sql: str, parameters: Any = ()) -> LoopCursor:
        await self._connection.call(self._cursor.execute, sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> LoopCursor:
        # A generator would be spent by a first try that met the lock.
        await self._connection.call(self._cursor.executemany, sql, list(parameters))
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


def connector(url: URL, lock_timeout: float) -> Callable[[], Awaitable[LoopConnection]]:
    """The `async_creator` for a `sqlite+aiosqlite` URL.

    The URL's options (`?uri=true`, `?timeout=`) are read as SQLAlchemy's own SQLite
    dialect reads them; a `timeout` there replaces `lock_timeout`.
    """
    args, options = SQLiteDialect_pysqlite().create_connect_args(url)
    options.update(isolation_level=None, check_same_thread=False)
    timeout = float(options.setdefault("timeout", lock_timeout))

    def opened() -> sqlite3.Connection:
        # Typed loosely: the overloads of `connect` cannot be matched to unpacked options.
        connect: Callable[..., sqlite3.Connection] = sqlite3.connect
        return connect(*args, **options)

    async def connect() -> LoopConnection:
        # Opening may meet the lock (a WAL file being recovered), so it goes to a thread,
        # once per pooled connection.
        sqlite = await asyncio.wrap_future(_LOCK_WAITS.submit(opened))
        sqlite.execute("PRAGMA busy_timeout=0")
        return LoopConnection(sqlite, timeout)

    return connect
