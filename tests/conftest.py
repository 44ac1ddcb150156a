"""Shared fixtures: settings in a temporary folder and a migrated database per test.

Every database-backed test runs twice: on SQLite (the embedded default) and on PostgreSQL
(`AIGEN_TEST_POSTGRES_URL`, default the local server), each time in a fresh database of its
own. `-m "not postgres"` leaves the PostgreSQL runs out on a machine without the server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from aigen import models  # noqa: F401  (registers every table)
from aigen.config import Settings
from aigen.db.base import Model
from aigen.db.migrate import upgrade
from aigen.db.session import Sessionmaker, create_engine, create_sessionmaker

T = TypeVar("T")

pytest_plugins = ["tests.fixtures.platform", "tests.fixtures.redis"]


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "environment": "test",
        "data_dir": tmp_path,
        "secret_key": "test-secret-" + "x" * 40,
        "poll_interval_seconds": 0.01,
        "lease_seconds": 2.0,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 0.5,
        "provider_retry_base_seconds": 0.01,
        "webhook_retry_schedule": [0, 0.1, 0.2, 0.3],
        "webhook_min_delay_after_throttle_seconds": 0.2,
        "webhook_timeout_seconds": 2.0,
        "webhook_allow_networks": ["127.0.0.0/8", "::1/128"],
        "local_models": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


POSTGRES_URL = os.environ.get(
    "AIGEN_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)


def _in_own_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from a session fixture, away from the tests' event loops."""
    result: list[T] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(coro)))
    thread.start()
    thread.join()
    return result[0]


async def _migrate(url: str) -> None:
    engine = create_engine(url)
    await upgrade(engine)
    await engine.dispose()


def _postgres(database: str | None = None) -> str:
    url = make_url(POSTGRES_URL).set(drivername="postgresql")
    if database:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


async def _execute(dsn: str, *statements: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrated once; each test copies the file (a migration per test costs far more)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    _in_own_loop(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """One migrated database for the session; each test starts from emptied tables."""
    name = f"aigen_test_{uuid.uuid4().hex[:12]}"
    _in_own_loop(_execute(_postgres(), f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    _in_own_loop(_migrate(url))
    yield name
    _in_own_loop(_execute(_postgres(), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# Every table but Alembic's own, emptied before each PostgreSQL test: far cheaper than a
# database per test. Connections a previous test left behind are ended first, so no lock
# of theirs can stall the TRUNCATE.
_EMPTY_TABLES = f"""
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid();
TRUNCATE {", ".join(t.name for t in Model.metadata.sorted_tables)} RESTART IDENTITY CASCADE;
"""


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A migrated database holding nothing, for this test alone."""
    if request.param == "sqlite":
        path = tmp_path / "test.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    name = request.getfixturevalue("postgres_database")
    await _execute(_postgres(name), _EMPTY_TABLES)
    yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path, database_url=database_url)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessionmaker(engine: AsyncEngine) -> Sessionmaker:
    return create_sessionmaker(engine)


async def _fresh_database_url(tmp_path: Path, kind: str) -> tuple[str, str | None]:
    """A database of its own (for tests whose processes outlive one test's tables)."""
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'own.db'}", None
    name = f"aigen_own_{uuid.uuid4().hex[:12]}"
    await _execute(_postgres(), f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    await _migrate(url)
    return url, name


async def _drop_database(name: str) -> None:
    await _execute(_postgres(), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
