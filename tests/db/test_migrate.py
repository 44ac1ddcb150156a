"""`aigen migrate` on a server that would let the plans of aigen's statements go stale
says so."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs
from typer.testing import CliRunner

from aigen.cli.main import app
from aigen.config import Settings


async def test_migrate_warns_when_the_server_never_analyzes_the_tables(
    engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    off = False
    if engine.dialect.name == "postgresql":
        async with engine.connect() as connection:
            off = (await connection.execute(text("SHOW autovacuum"))).scalar() == "off"
    monkeypatch.setenv("AIGEN_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("AIGEN_DATA_DIR", str(settings.data_dir))

    with capture_logs() as logs:
        # The command runs its own event loop: in a thread of its own, off this test's.
        result = await asyncio.to_thread(CliRunner().invoke, app, ["migrate"])

    assert result.exit_code == 0, result.output
    assert "database is up to date" in result.output
    warnings = [entry for entry in logs if entry["event"] == "db.autovacuum_off"]
    assert [entry["log_level"] for entry in warnings] == (["warning"] if off else [])
