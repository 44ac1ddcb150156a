"""Apply the Alembic migrations programmatically (`aigen migrate`, and `aigen up` first)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    return config


def _upgrade_on(connection: object, url: str) -> None:
    config = alembic_config(url)
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def upgrade(engine: AsyncEngine) -> None:
    """Migrate the database of `engine` to the newest revision."""
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    url = engine.url.render_as_string(hide_password=False)
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade_on, url)


async def autovacuum_off(engine: AsyncEngine) -> bool:
    """Whether the PostgreSQL server of `engine` runs without autovacuum.

    Then no table is ever analyzed, and the plans that PostgreSQL keeps for aigen's
    prepared statements (asyncpg prepares every one; after its fifth run a statement
    runs on a generic plan, made from the tables' statistics) stay those of tables that
    held a page: sequential scans, which read more rows with every job the database
    gains (BENCHMARKS.md, the nineteenth session)."""
    if engine.dialect.name != "postgresql":
        return False
    async with engine.connect() as connection:
        return (await connection.execute(text("SHOW autovacuum"))).scalar() == "off"
