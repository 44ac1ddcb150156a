"""Shared fixtures: settings in a temporary folder and a migrated database per test.

Every database-backed test runs twice: on SQLite (the embedded default) and on PostgreSQL
(`AIGEN_TEST_POSTGRES_URL`, default the local server), each time in a fresh database of its
own. `-m "not postgres"` leaves the PostgreSQL runs out on a machine without the server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from aigen.config import Settings
from aigen.db.migrate import upgrade
from aigen.db.session import Sessionmaker, create_engine, create_sessionmaker

pytest_plugins = ["tests.fixtures.platform"]


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


async def _fresh_database_url(tmp_path: Path, kind: str) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}", None
    base = POSTGRES_URL
    name = f"aigen_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    async with admin.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await admin.dispose()
    return make_url(base).set(database=name).render_as_string(hide_password=False), name


async def _drop_database(name: str) -> None:
    admin = create_engine(POSTGRES_URL)
    async with admin.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    await admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    url, name = await _fresh_database_url(tmp_path, request.param)
    yield url
    if name:
        await _drop_database(name)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path, database_url=database_url)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    await upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessionmaker(engine: AsyncEngine) -> Sessionmaker:
    return create_sessionmaker(engine)
