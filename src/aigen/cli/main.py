"""`aigen`: run the platform, one part of it, or administer it (DESIGN §11)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import structlog
import typer

from aigen import logs, runtime
from aigen.bootstrap import build_deps
from aigen.config import Environment, Settings
from aigen.db.migrate import autovacuum_off, upgrade
from aigen.db.session import create_engine

from . import admin, demo
from .common import load_settings, run

log = structlog.get_logger(__name__)

app = typer.Typer(
    help="aigen: a self-hostable asynchronous AI generation API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(admin.accounts, name="accounts")
app.add_typer(admin.keys, name="keys")
app.add_typer(admin.credits, name="credits")
app.add_typer(admin.jobs, name="jobs")
app.command("usage")(admin.usage_report)
app.command("demo")(demo.demo)

Host = Annotated[str, typer.Option(help="address to listen on")]
Port = Annotated[int, typer.Option(help="port to listen on")]


async def _migrate(settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    try:
        await upgrade(engine)
        if await autovacuum_off(engine):
            log.warning(
                "db.autovacuum_off",
                hint="turn PostgreSQL's autovacuum on (its default): without it the tables "
                "are never analyzed, the plans of aigen's statements stay those of empty "
                "tables, and every job costs more as the tables grow",
            )
    finally:
        await engine.dispose()


async def _run(
    settings: Settings, parts: list[str], *, api: tuple[str, int] | None, migrate: bool
) -> None:
    if api is not None and "public_url" not in settings.model_fields_set:
        # Asset links must point where this process listens unless told otherwise.
        settings = settings.model_copy(update={"public_url": f"http://{api[0]}:{api[1]}"})
    json_logs = settings.log_json
    if json_logs is None:
        json_logs = settings.environment is not Environment.development
    logs.configure(json=json_logs, level=settings.log_level)
    if migrate:
        await _migrate(settings)
    deps = await build_deps(settings)
    stop = asyncio.Event()
    runtime.install_stop_signals(stop)
    try:
        serving = None
        if api is not None:
            serving = runtime.serve_api(deps, stop, host=api[0], port=api[1])
        await runtime.run_parts(deps, parts, stop, serving=serving)
    finally:
        await deps.aclose()


@app.command()
def up(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Every part in one process, on whatever the configuration names; migrates first."""
    settings = load_settings()
    typer.echo(f"aigen up: http://{host}:{port}  (docs at /docs; Ctrl-C stops)")
    run(_run(settings, list(runtime.BACKGROUND), api=(host, port), migrate=True))


@app.command()
def api(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """The HTTP API alone (gateway and backend endpoints)."""
    run(_run(load_settings(), [], api=(host, port), migrate=False))


@app.command()
def worker() -> None:
    """The workflow worker: runs models and stores assets (scale out: run many)."""
    run(_run(load_settings(), ["worker"], api=None, migrate=False))


@app.command()
def backend() -> None:
    """The backend consumer: applies results to jobs and credits."""
    run(_run(load_settings(), ["backend"], api=None, migrate=False))


@app.command()
def notifier() -> None:
    """The notification service: signed webhook deliveries and their retries."""
    run(_run(load_settings(), ["notifier"], api=None, migrate=False))


@app.command()
def relay() -> None:
    """The outbox relay: publishes committed events to the broker."""
    run(_run(load_settings(), ["relay"], api=None, migrate=False))


@app.command()
def migrate() -> None:
    """Apply the database migrations."""
    run(_migrate(load_settings()))
    typer.echo("database is up to date")
