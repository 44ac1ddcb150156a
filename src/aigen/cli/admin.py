"""Admin commands: accounts, keys, credits, jobs (DESIGN §11); each takes `--json`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from aigen.backend.account import service as account_service
from aigen.backend.billing import service as billing
from aigen.backend.job import service as job_service
from aigen.backend.key import service as key_service
from aigen.errors import AppError
from aigen.models import ApiKey, Job

from .common import admin_session, emit, fail, load_settings, run

accounts = typer.Typer(help="Accounts: the customers that own keys, credits and jobs.")
keys = typer.Typer(help="API keys: shown once, stored hashed.")
credits = typer.Typer(help="Credits: ledger entries.")
jobs = typer.Typer(help="Jobs: look at what ran.")

JsonFlag = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _key_row(row: ApiKey) -> dict[str, Any]:
    return {
        "id": row.id,
        "account_id": row.account_id,
        "prefix": row.prefix,
        "last4": row.last4,
        "scopes": row.scope_list,
        "rpm": row.rpm,
        "concurrency": row.concurrency,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
    }


def _job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "account_id": job.account_id,
        "model": job.model,
        "status": job.status,
        "attempt": job.attempt,
        "credits_reserved": job.credits_reserved,
        "credits_charged": job.credits_charged,
        "usage": job.usage,
        "error": job.error,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }


@accounts.command("create")
def accounts_create(
    name: str,
    credits_: Annotated[int, typer.Option("--credits", min=0, help="initial grant")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Create an account (and its default webhook secret)."""

    async def action() -> dict[str, Any]:
        async with admin_session(load_settings()) as session:
            account = await account_service.create(session, name, credits=credits_)
            return {
                "id": account.id,
                "name": account.name,
                "balance": account.balance,
                "webhook_secret": account.webhook_secret,
            }

    emit(run(action()), as_json=as_json)


@accounts.command("list")
def accounts_list(as_json: JsonFlag = False) -> None:
    async def action() -> list[dict[str, Any]]:
        async with admin_session(load_settings()) as session:
            return [
                {"id": a.id, "name": a.name, "status": a.status, "balance": a.balance}
                for a in await account_service.list_all(session)
            ]

    emit(run(action()), as_json=as_json)


@keys.command("create")
def keys_create(
    account: Annotated[str, typer.Option("--account", help="account id")],
    scopes: Annotated[str, typer.Option(help="comma-separated")] = "generate,read,webhooks",
    rpm: Annotated[int | None, typer.Option(min=1, help="requests per minute")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="jobs at once")] = None,
    expires_in: Annotated[float | None, typer.Option("--expires-in", help="days")] = None,
    name: Annotated[str | None, typer.Option(help="a label")] = None,
    test: Annotated[bool, typer.Option("--test", help="an aig_test_ key")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Create an API key; the key itself is printed once and never stored."""
    settings = load_settings()

    async def action() -> dict[str, Any]:
        async with admin_session(settings) as session:
            row, plaintext = await key_service.create(
                session,
                account_id=account,
                secret=settings.resolved_secret(),
                scopes=[s.strip() for s in scopes.split(",") if s.strip()],
                name=name,
                rpm=rpm,
                concurrency=concurrency,
                expires_in_days=expires_in,
                live=not test,
            )
            return {"id": row.id, "key": plaintext, "prefix": row.prefix, "scopes": row.scope_list}

    try:
        emit(run(action()), as_json=as_json)
    except AppError as error:
        fail(error.message)


@keys.command("revoke")
def keys_revoke(key_id: str, as_json: JsonFlag = False) -> None:
    """Revoke a key; every API process refuses it within the key cache time (5 s)."""

    async def action() -> dict[str, Any]:
        async with admin_session(load_settings()) as session:
            return _key_row(await key_service.revoke(session, key_id))

    try:
        emit(run(action()), as_json=as_json)
    except AppError as error:
        fail(error.message)


@keys.command("list")
def keys_list(
    account: Annotated[str, typer.Option("--account", help="account id")],
    as_json: JsonFlag = False,
) -> None:
    async def action() -> list[dict[str, Any]]:
        async with admin_session(load_settings()) as session:
            return [_key_row(row) for row in await key_service.list_for(session, account)]

    emit(
        run(action()),
        as_json=as_json,
        columns=["id", "prefix", "last4", "scopes", "created_at", "last_used_at", "revoked_at"],
    )


@credits.command("grant")
def credits_grant(
    account_id: str,
    amount: Annotated[int, typer.Argument(min=1)],
    note: Annotated[str | None, typer.Option(help="why")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Add credits to an account (a `grant` ledger entry)."""

    async def action() -> dict[str, Any]:
        async with admin_session(load_settings()) as session:
            entry = await billing.grant(session, account_id, amount, note=note)
            return {
                "account_id": account_id,
                "entry_id": entry.id,
                "amount": amount,
                "balance": await billing.balance(session, account_id),
            }

    try:
        emit(run(action()), as_json=as_json)
    except AppError as error:
        fail(error.message)


@jobs.command("list")
def jobs_list(
    account: Annotated[str | None, typer.Option("--account", help="account id")] = None,
    status: Annotated[str | None, typer.Option(help="only this status")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    as_json: JsonFlag = False,
) -> None:
    async def action() -> list[dict[str, Any]]:
        async with admin_session(load_settings()) as session:
            found = await job_service.list_for(session, account, status=status, limit=limit)
            return [_job_row(job) for job in found]

    emit(
        run(action()),
        as_json=as_json,
        columns=["id", "model", "status", "credits_reserved", "credits_charged", "created_at"],
    )


@jobs.command("show")
def jobs_show(job_id: str, as_json: JsonFlag = False) -> None:
    async def action() -> dict[str, Any]:
        async with admin_session(load_settings()) as session:
            return _job_row(await job_service.get(session, job_id))

    try:
        emit(run(action()), as_json=as_json)
    except AppError as error:
        fail(error.message)
