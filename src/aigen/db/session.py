"""Engine and session factory; SQLite is tuned so one process can run every part at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

Sessionmaker = async_sessionmaker[AsyncSession]


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _tune_sqlite(engine)
        return engine
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _tune_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets readers run beside the one writer; pysqlite's own BEGIN handling is
        # switched off so that every transaction can start as BEGIN IMMEDIATE below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Taking the write lock at BEGIN serialises writers up front: a deferred
        # transaction that reads and then writes could otherwise fail with SQLITE_BUSY,
        # and the read-check-write sequences (credit holds, job claims) stay exact.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_sessionmaker(engine: AsyncEngine) -> Sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def unit_of_work(sessionmaker: Sessionmaker) -> AsyncIterator[AsyncSession]:
    """One transaction: committed when the block ends, rolled back when it raises."""
    async with sessionmaker() as session, session.begin():
        yield session


def is_postgres(session: AsyncSession) -> bool:
    """Row locks (`FOR UPDATE [SKIP LOCKED]`) only where the database has them."""
    bind = session.get_bind()
    return bind.dialect.name == "postgresql"
