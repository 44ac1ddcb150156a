"""Admin commands: accounts, keys, credits, jobs (DESIGN §11); each takes `--json`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer

from aigen.backend.account import service as account_service
from aigen.backend.billing import service as billing
from aigen.backend.billing import usage
from aigen.backend.job import service as job_service
from aigen.backend.key import service as key_service
from aigen.bootstrap import create_revocations
from aigen.clock import utcnow
from aigen.models import ApiKey, Job

from .common import admin_session, emit, fail, load_settings, run, run_or_fail

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
        "name": row.name,
        "rpm": row.rpm,
        "concurrency": row.concurrency,
        "jobs_per_day": row.jobs_per_day,
        "jobs_per_month": row.jobs_per_month,
        "credits_per_day": row.credits_per_day,
        "credits_per_month": row.credits_per_month,
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


@accounts.command("show")
def accounts_show(account_id: str, as_json: JsonFlag = False) -> None:
    """Balance, and each key's limits with what its jobs have used of them (`GET
    /v1/account` for an operator; counted from the database, as the limiter counts)."""

    async def action() -> dict[str, Any]:
        async with admin_session(load_settings()) as session:
            account = await account_service.get(session, account_id)
            if account is None:
                raise billing.AccountNotFoundError(f"no account {account_id}")
            now = utcnow()
            day = now.replace(hour=0, minute=0, second=0, microsecond=0)
            month = day.replace(day=1)
            keys_out = []
            for row in await key_service.list_for(session, account_id):
                jobs_today, credits_today = await usage.key_spend(session, row.id, since=day)
                jobs_month, credits_month = await usage.key_spend(session, row.id, since=month)
                keys_out.append(
                    {
                        **_key_row(row),
                        "jobs_today": jobs_today,
                        "credits_today": credits_today,
                        "jobs_this_month": jobs_month,
                        "credits_this_month": credits_month,
                    }
                )
            return {
                "id": account.id,
                "name": account.name,
                "status": account.status,
                "balance": account.balance,
                "ledger_sum": await billing.ledger_sum(session, account_id),
                "keys": keys_out,
            }

    data = run_or_fail(action())
    if as_json:
        emit(data, as_json=True)
        return
    emit({k: v for k, v in data.items() if k != "keys"}, as_json=False)
    typer.echo("")
    emit(
        data["keys"],
        as_json=False,
        columns=[
            "id",
            "prefix",
            "rpm",
            "concurrency",
            "jobs_per_day",
            "jobs_today",
            "credits_per_day",
            "credits_today",
            "jobs_per_month",
            "jobs_this_month",
            "credits_per_month",
            "credits_this_month",
        ],
    )


def usage_report(
    account: Annotated[str, typer.Option("--account", help="account id")],
    start: Annotated[
        datetime | None, typer.Option("--from", help="inclusive, UTC; default: this month")
    ] = None,
    end: Annotated[
        datetime | None, typer.Option("--to", help="exclusive, UTC; default: now")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="ledger entries")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """Usage by model and by day, and the ledger entries of a period (`GET /v1/usage`)."""

    try:
        period_start, period_end = usage.period(start, end, now=utcnow())
    except ValueError as error:
        fail(str(error))

    async def action() -> dict[str, Any]:
        async with admin_session(load_settings()) as session:
            if await account_service.get(session, account) is None:
                raise billing.AccountNotFoundError(f"no account {account}")
            report = await usage.report(
                session, account, start=period_start, end=period_end, limit=limit
            )
        return report.model_dump(mode="json", by_alias=True)

    data = run_or_fail(action())
    if as_json:
        emit(data, as_json=True)
        return
    typer.echo(f"usage of {account} from {data['from']} to {data['to']}")
    emit(data["totals"], as_json=False)
    typer.echo("")
    emit(data["by_model"], as_json=False, columns=["model", "jobs", "credits_charged"])
    typer.echo("")
    emit(data["by_day"], as_json=False, columns=["date", "jobs", "credits_charged"])
    typer.echo("")
    emit(
        data["entries"],
        as_json=False,
        columns=["id", "created_at", "kind", "amount", "job_id", "model", "note"],
    )


@keys.command("create")
def keys_create(
    account: Annotated[str, typer.Option("--account", help="account id")],
    scopes: Annotated[str, typer.Option(help="comma-separated")] = "generate,read,webhooks",
    rpm: Annotated[int | None, typer.Option(min=1, help="requests per minute")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="jobs at once")] = None,
    jobs_per_day: Annotated[int | None, typer.Option(min=0, help="jobs per UTC day")] = None,
    jobs_per_month: Annotated[int | None, typer.Option(min=0, help="jobs per month")] = None,
    credits_per_day: Annotated[
        int | None, typer.Option(min=0, help="credits per UTC day (holds count)")
    ] = None,
    credits_per_month: Annotated[
        int | None, typer.Option(min=0, help="credits per month (holds count)")
    ] = None,
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
                jobs_per_day=jobs_per_day,
                jobs_per_month=jobs_per_month,
                credits_per_day=credits_per_day,
                credits_per_month=credits_per_month,
                expires_in_days=expires_in,
                live=not test,
            )
            return {"id": row.id, "key": plaintext, "prefix": row.prefix, "scopes": row.scope_list}

    emit(run_or_fail(action()), as_json=as_json)


@keys.command("revoke")
def keys_revoke(key_id: str, as_json: JsonFlag = False) -> None:
    """Revoke a key; every API process refuses it within the key cache time (5 s), and at
    once when they share Redis (the revocation is published after the commit)."""
    settings = load_settings()

    async def action() -> dict[str, Any]:
        async with admin_session(settings) as session:
            row = _key_row(await key_service.revoke(session, key_id))
        revocations = create_revocations(settings)
        try:
            await revocations.publish(key_id)
        finally:
            await revocations.aclose()
        return row

    emit(run_or_fail(action()), as_json=as_json)


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
        columns=[
            "id",
            "name",
            "prefix",
            "last4",
            "scopes",
            "created_at",
            "last_used_at",
            "expires_at",
            "revoked_at",
        ],
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

    emit(run_or_fail(action()), as_json=as_json)


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

    emit(run_or_fail(action()), as_json=as_json)
