"""What every command shares: settings, a migrated database session, output as table or JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.config import Settings
from aigen.db.migrate import upgrade
from aigen.db.session import create_engine, create_sessionmaker
from aigen.errors import AppError

T = TypeVar("T")


def load_settings() -> Settings:
    return Settings()


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


@asynccontextmanager
async def admin_session(settings: Settings) -> AsyncIterator[AsyncSession]:
    """A migrated database and one transaction, committed when the command succeeds."""
    engine = create_engine(settings.database_url)
    try:
        await upgrade(engine)
        async with create_sessionmaker(engine)() as session, session.begin():
            yield session
    finally:
        await engine.dispose()


def emit(data: Any, *, as_json: bool, columns: Sequence[str] | None = None) -> None:
    """JSON for scripts (`--json`), a plain aligned table for people."""
    if as_json:
        typer.echo(json.dumps(data, default=str, indent=2))
        return
    rows = data if isinstance(data, list) else [data]
    if not rows:
        typer.echo("(none)")
        return
    names = list(columns or rows[0].keys())
    cells = [[str(row.get(name, "")) for name in names] for row in rows]
    widths = [max(len(name), *(len(c[i]) for c in cells)) for i, name in enumerate(names)]
    typer.echo("  ".join(name.upper().ljust(w) for name, w in zip(names, widths, strict=True)))
    for cell in cells:
        typer.echo("  ".join(value.ljust(w) for value, w in zip(cell, widths, strict=True)))


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def run_or_fail(coro: Awaitable[T]) -> T:
    """`run`, with a refusal (an `AppError`) reported as `error: …` and exit status 1."""
    try:
        return run(coro)
    except AppError as error:
        fail(error.message)


Action = Callable[[AsyncSession], Awaitable[T]]
