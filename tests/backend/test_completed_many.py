"""Completed results applied together (`apply_completed_many`, the backend's handler):
the same jobs, money and assets as one result after another, in a few statements."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from sqlalchemy import event, select

from aigen.backend import handlers
from aigen.backend.billing import service as billing
from aigen.backend.job import service as job_service
from aigen.bus.messages import AIGenerationJobCompleted, AssetRef, Envelope
from aigen.db.session import unit_of_work
from aigen.models import Asset, CreditEntry, Job
from aigen.serving.base import Usage
from tests.fixtures.platform import Api, Customer


async def _processing(api: Api, customer: Customer, count: int) -> list[str]:
    """`count` jobs of the customer, held 6 credits each and claimed (attempt 1)."""
    ids = []
    async with unit_of_work(api.deps.sessionmaker) as session:
        principal = customer.principal()
        for _ in range(count):
            new = job_service.NewJob(model="scripted-text", task="text", input={}, hold=6)
            ids.append((await job_service.create(session, principal, new)).job.id)
    async with unit_of_work(api.deps.sessionmaker) as session:
        for job_id in ids:
            assert await job_service.claim(session, job_id) is not None
    return ids


def _result(
    job_id: str, account_id: str, *, tokens: int, attempt: int = 1
) -> AIGenerationJobCompleted:
    asset = AssetRef(key=f"{job_id}/0.txt", content_type="text/plain", bytes=5, sha256="0" * 64)
    return AIGenerationJobCompleted(
        job_id=job_id,
        account_id=account_id,
        attempt=attempt,
        assets=[asset],
        usage={"input_tokens": 1, "output_tokens": tokens, "images": 0},
    )


def _price(job: Job, message: AIGenerationJobCompleted) -> int:
    return message.usage["output_tokens"]


async def _scenario(api: Api) -> tuple[list[str], list[str], list[AIGenerationJobCompleted]]:
    """Jobs of two accounts and their results, in the order they come: the jobs' and
    accounts' ids, and the results."""
    first, second = await api.customer(credits=100), await api.customer(credits=100)
    a = await _processing(api, first, 2)
    b = await _processing(api, second, 3)
    async with unit_of_work(api.deps.sessionmaker) as session:
        assert await job_service.claim(session, b[1]) is not None  # now at attempt 2
        await job_service.cancel(session, b[2], account_id=second.account_id)
    results = [
        _result(b[0], second.account_id, tokens=4),
        _result(a[0], first.account_id, tokens=2),
        _result(b[1], second.account_id, tokens=1),  # attempt 1: stale
        _result(a[1], first.account_id, tokens=99),  # above the hold: charged 6
        _result(b[2], second.account_id, tokens=1),  # canceled: stale
        _result(a[0], first.account_id, tokens=3),  # a second result for a[0]: stale
    ]
    return [*a, *b], [first.account_id, second.account_id], results


async def _state(api: Api, job_ids: list[str], account_ids: list[str]) -> Any:
    """What a user sees of the jobs and the accounts, with each job's place for its id."""
    async with api.deps.sessionmaker() as session:
        jobs = []
        for number, job_id in enumerate(job_ids):
            job = await session.get(Job, job_id)
            assert job is not None
            entries = await session.execute(
                select(CreditEntry.kind, CreditEntry.amount)
                .where(CreditEntry.job_id == job_id)
                .order_by(CreditEntry.kind)
            )
            assets = await session.scalars(select(Asset.content_type).where(Asset.job_id == job_id))
            usage = job.usage["output_tokens"] if job.usage else None
            ledger = [(kind, amount) for kind, amount in entries]
            jobs.append(
                (number, job.status, job.attempt, usage, job.credits_charged, ledger, list(assets))
            )
        balances = [await billing.balance(session, account_id) for account_id in account_ids]
        sums = [await billing.ledger_sum(session, account_id) for account_id in account_ids]
    return jobs, balances, sums


async def test_results_together_come_out_as_one_after_the_other(api: Api) -> None:
    together_ids, together_accounts, together = await _scenario(api)
    alone_ids, alone_accounts, alone = await _scenario(api)

    async with unit_of_work(api.deps.sessionmaker) as session:
        done = await job_service.apply_completed_many(session, together, price=_price)
    async with unit_of_work(api.deps.sessionmaker) as session:
        one_by_one = [
            await job_service.apply_completed(session, r, price=partial(_price, message=r))
            for r in alone
        ]

    assert [job is not None for job in done] == [True, True, False, True, False, False]
    assert [job is not None for job in one_by_one] == [job is not None for job in done]
    assert [job.credits_charged for job in done if job] == [4, 2, 6]
    jobs, balances, sums = await _state(api, together_ids, together_accounts)
    assert (jobs, balances, sums) == await _state(api, alone_ids, alone_accounts)
    assert balances == sums == [100 - 2 - 6, 100 - 4 - 6]  # b[1] still holds its 6
    assert jobs[0][1:] == (
        "completed",
        1,
        2,
        2,
        [("capture", -2), ("hold", -6), ("release", 6)],
        ["text/plain"],
    )


async def test_results_together_are_five_statements_however_many(api: Api) -> None:
    customer = await api.customer(credits=100)
    jobs = await _processing(api, customer, 6)
    results = [_result(job_id, customer.account_id, tokens=1) for job_id in jobs]
    statements: list[str] = []
    engine = api.deps.engine.sync_engine
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    async with unit_of_work(api.deps.sessionmaker) as session:
        done = await job_service.apply_completed_many(session, results, price=_price)
        # The transitions, the assets, the balance, the ledger rows, usage and charges.
        assert len([s for s in statements if not s.startswith("BEGIN")]) == 5
    assert all(job is not None and job.status == "completed" for job in done)
    async with api.deps.sessionmaker() as session:
        assert await billing.balance(session, customer.account_id) == 100 - 6
        assert await billing.ledger_sum(session, customer.account_id) == 100 - 6


async def test_the_backend_settles_each_result_once_however_it_comes(api: Api) -> None:
    customer = await api.customer(credits=100)
    jobs = await _processing(api, customer, 4)
    envelopes = [Envelope.wrap(_result(job_id, customer.account_id, tokens=3)) for job_id in jobs]

    def pricer(model: str, usage: Usage) -> int:
        return usage.output_tokens

    handle = handlers.make_handler(api.deps.sessionmaker, pricer)
    transitions: list[str] = []
    event.listen(
        api.deps.engine.sync_engine,
        "before_cursor_execute",
        lambda *a: transitions.append(a[2]) if a[2].startswith("UPDATE jobs SET status") else None,
    )
    # Every result arrives at once, one of them twice: they share a transaction, and one
    # compare-and-set moves all the jobs.
    await asyncio.gather(*(handle(e) for e in [*envelopes, envelopes[1]]))
    assert len(transitions) == 1
    await handle(envelopes[2])  # redelivered later

    async with api.deps.sessionmaker() as session:
        for job_id in jobs:
            job = await session.get(Job, job_id)
            assert job is not None
            assert (job.status, job.credits_charged) == ("completed", 3)
        assert await billing.balance(session, customer.account_id) == 100 - 4 * 3
        assert await billing.ledger_sum(session, customer.account_id) == 100 - 4 * 3
        kinds = await session.scalars(select(CreditEntry.kind).where(CreditEntry.job_id == jobs[1]))
        assert sorted(kinds) == ["capture", "hold", "release"]
