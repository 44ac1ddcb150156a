"""Completed results applied together (`apply_completed_many`, the backend's handler):
the same jobs, money and assets as one result after another, in a few statements."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.backend import handlers
from aigen.backend.billing import service as billing
from aigen.backend.job import service as job_service
from aigen.bus import inbox
from aigen.bus.messages import AIGenerationJobCompleted, AssetRef, Envelope
from aigen.db import together
from aigen.db.group import GroupCommit
from aigen.db.session import unit_of_work
from aigen.models import Asset, CreditEntry, Job
from aigen.serving.base import Usage
from tests.fixtures.asyncpg_calls import count_begins
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

    handle = handlers.make_handler(api.deps.sessionmaker, _pricer)
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


async def test_results_alone_settle_as_in_a_transaction_each(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend's results that come alone (most of them below the maximum): the jobs,
    money, assets and outcomes of a transaction each (the inbox row, then the result),
    and on PostgreSQL a fresh result is a read of its job and one statement, with no
    BEGIN: both commit by themselves."""
    ids, accounts, results = await _scenario(api)
    before_ids, before_accounts, before = await _scenario(api)
    envelopes = [Envelope.wrap(result) for result in results]
    envelopes.append(envelopes[0])  # redelivered
    statements: list[str] = []
    event.listen(
        api.deps.engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2])
    )
    begins = count_begins(monkeypatch)
    group = GroupCommit(api.deps.sessionmaker)

    def apply(session: AsyncSession, alone: Sequence[Envelope]) -> Any:
        return handlers._apply_completed(session, alone, _pricer)

    outcomes = [await group.run_batched(apply, envelopes[0], order="a")]
    first = ([s.split()[0] for s in statements], len(begins))
    outcomes += [await group.run_batched(apply, e, order="a") for e in envelopes[1:]]
    expected = []
    before_envelopes = [Envelope.wrap(result) for result in before]
    for envelope in [*before_envelopes, before_envelopes[0]]:
        async with unit_of_work(api.deps.sessionmaker) as session:
            expected.append(await handlers._apply(session, envelope, _pricer))

    assert [o for o, _ in outcomes] == [
        *("completed", "completed", "stale", "completed", "stale", "stale", "duplicate")
    ]
    ended = [(o, ids.index(j.id) if j else None) for o, j in outcomes]
    assert ended == [(o, before_ids.index(j.id) if j else None) for o, j in expected]
    state = await _state(api, ids, accounts)
    assert state == await _state(api, before_ids, before_accounts)
    if api.deps.engine.dialect.name == "postgresql":
        assert first == (["SELECT", "WITH"], 0)


def _pricer(model: str, usage: Usage) -> int:
    return usage.output_tokens


# Only where the read runs outside the transaction: on SQLite the read begins it, and the
# cancel of another session would wait for it.
@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_result_whose_job_moves_on_after_its_read_settles_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job read for a result alone is canceled before the result's statement: the
    statement changes nothing (no charge, no assets, no ledger rows, no inbox row), and
    the result is stale, its job the canceled one."""
    customer = await api.customer(credits=100)
    [job_id] = await _processing(api, customer, 1)
    envelope = Envelope.wrap(_result(job_id, customer.account_id, tokens=4))
    write_after = together.write_after

    async def canceled_first(*args: Any, **kwargs: Any) -> Any:
        async with unit_of_work(api.deps.sessionmaker) as other:
            await job_service.cancel(other, job_id, account_id=customer.account_id)
        return await write_after(*args, **kwargs)

    monkeypatch.setattr(together, "write_after", canceled_first)
    group = GroupCommit(api.deps.sessionmaker)
    outcome, ended = await group.run_batched(
        lambda session, alone: handlers._apply_completed(session, alone, _pricer), envelope
    )

    assert outcome == "stale"
    assert ended is not None
    assert (ended.id, ended.status) == (job_id, "canceled")
    async with api.deps.sessionmaker() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.credits_charged, job.usage) == ("canceled", 0, None)
        kinds = await session.scalars(select(CreditEntry.kind).where(CreditEntry.job_id == job_id))
        assert sorted(kinds) == ["hold", "release"]
        assert (await session.scalars(select(Asset).where(Asset.job_id == job_id))).all() == []
        assert await billing.balance(session, customer.account_id) == 100
        assert await billing.ledger_sum(session, customer.account_id) == 100
        assert not await inbox.recorded(session, handlers.CONSUMER, [envelope.id])
