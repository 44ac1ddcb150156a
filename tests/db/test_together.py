"""`db.together.write`: writes sent together give the rows of their statements run one
after another, on both databases; on PostgreSQL they are one statement."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import bindparam, event, exc, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from aigen.bus import inbox
from aigen.db import together
from aigen.db.base import table
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import Account, CreditEntry, Job

_ACCOUNTS = table(Account)
_JOBS = table(Job)
# Built once, as the hot statements are.
_ADD_ACCOUNTS = insert(_ACCOUNTS)
_ADD_JOBS = insert(_JOBS)
_ADD_ENTRIES = insert(table(CreditEntry))
_CHANGE_BALANCE = (
    update(_ACCOUNTS)
    .where(_ACCOUNTS.c.id == bindparam("b_account"))
    .values(balance=_ACCOUNTS.c.balance + bindparam("b_delta"))
)
_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _account(account_id: str, balance: int) -> dict[str, object]:
    return {
        "id": account_id,
        "name": account_id,
        "status": "active",
        "balance": balance,
        "intakes": 0,
        "webhook_secret": "s",
        "created_at": _AT,
    }


def _job(job_id: str, account_id: str, **columns: object) -> dict[str, object]:
    return {
        "id": job_id,
        "account_id": account_id,
        "api_key_id": "key_1",
        "model": "m",
        "task": "text",
        "input": {"prompt": "hi", "n": [1, 2]},
        "status": "pending",
        "attempt": 0,
        "webhook_url": None,
        "webhook_events": None,
        "metadata": None,
        "credits_reserved": 5,
        "deadline_at": None,
        "created_at": _AT,
        "updated_at": _AT,
        **columns,
    }


def _entry(account_id: str, job_id: str | None, amount: int) -> dict[str, object]:
    return {
        "account_id": account_id,
        "job_id": job_id,
        "kind": "hold",
        "amount": amount,
        "model": "m",
        "created_at": _AT,
    }


async def test_the_writes_give_the_rows_of_their_statements(sessionmaker: Sessionmaker) -> None:
    async with unit_of_work(sessionmaker) as session:
        await together.write(session, [(_ADD_ACCOUNTS, [_account("acct_old", 100)])])
    # Another offset, given to a UTC column: stored as the same instant.
    later = _AT.astimezone(timezone(timedelta(hours=2))) + timedelta(seconds=1)
    async with unit_of_work(sessionmaker) as session:
        changed = await together.write(
            session,
            [
                (_ADD_ACCOUNTS, [_account("acct_new", 7)]),
                # Rows that reference the account above, inserted by the same call.
                (
                    _ADD_JOBS,
                    [
                        _job("job_1", "acct_new", metadata={"k": "v"}, webhook_events=["a"]),
                        _job("job_2", "acct_old", deadline_at=later),
                    ],
                ),
                (
                    _ADD_ENTRIES,
                    [_entry("acct_new", "job_1", -5), _entry("acct_old", "job_2", -5)],
                ),
                (_CHANGE_BALANCE, [{"b_account": "acct_old", "b_delta": -5}]),
                (_ADD_ENTRIES, []),  # no rows: nothing to write
            ],
        )
        # The last write's rows: the account's update found it.
        missing = await together.write(
            session,
            [
                (_ADD_ENTRIES, [_entry("acct_old", None, 1)]),
                (_CHANGE_BALANCE, [{"b_account": "acct_none", "b_delta": 1}]),
            ],
        )
    async with sessionmaker() as session:
        jobs = {job.id: job for job in (await session.scalars(select(Job))).all()}
        balances = dict((await session.execute(select(Account.id, Account.balance))).all())
        entries = sorted(
            (await session.execute(select(CreditEntry.job_id, CreditEntry.amount))).all(),
            key=str,
        )

    assert (changed, missing) == (1, 0)
    assert balances == {"acct_old": 95, "acct_new": 7}
    assert entries == [("job_1", -5), ("job_2", -5), (None, 1)]  # (sorted as text)
    first, second = jobs["job_1"], jobs["job_2"]
    assert first.input == {"prompt": "hi", "n": [1, 2]}
    assert first.meta == {"k": "v"}
    assert first.webhook_events == ["a"]
    assert second.meta is None
    assert second.webhook_events is None
    assert second.deadline_at == _AT + timedelta(seconds=1)
    assert second.created_at == _AT


async def test_on_postgresql_they_are_one_statement(
    engine: AsyncEngine, sessionmaker: Sessionmaker
) -> None:
    seen: list[str] = []

    def watch(*args: object) -> None:
        if not str(args[2]).startswith("BEGIN"):  # SQLite's BEGIN IMMEDIATE
            seen.append(str(args[2]).split()[0])

    event.listen(engine.sync_engine, "before_cursor_execute", watch)
    for size in (1, 3, 2):  # one statement for every batch size
        async with unit_of_work(sessionmaker) as session:
            await together.write(
                session,
                [
                    (_ADD_ACCOUNTS, [_account(f"acct_{size}_{n}", 0) for n in range(size)]),
                    (_ADD_ENTRIES, [_entry(f"acct_{size}_{n}", None, 1) for n in range(size)]),
                ],
            )
    event.remove(engine.sync_engine, "before_cursor_execute", watch)
    async with sessionmaker() as session:
        count = len((await session.scalars(select(CreditEntry.id))).all())

    if engine.dialect.name == "postgresql":
        assert seen == ["WITH"] * 3
    else:
        assert seen == ["INSERT", "INSERT"] * 3
    assert count == 6


async def test_a_violated_constraint_takes_every_write_back(sessionmaker: Sessionmaker) -> None:
    async with unit_of_work(sessionmaker) as session:
        await together.write(session, [(_ADD_ACCOUNTS, [_account("acct_1", 10)])])
    with pytest.raises(exc.IntegrityError):
        async with unit_of_work(sessionmaker) as session:
            await together.write(
                session,
                [
                    (_CHANGE_BALANCE, [{"b_account": "acct_1", "b_delta": 5}]),
                    (_ADD_ENTRIES, [_entry("acct_1", None, 5)]),
                    (_ADD_ACCOUNTS, [_account("acct_1", 0)]),  # taken
                ],
            )
    async with sessionmaker() as session:
        balance = await session.scalar(select(Account.balance))
        entries = (await session.scalars(select(CreditEntry.id))).all()

    assert balance == 10
    assert entries == []


async def test_a_write_it_cannot_send_as_given_is_refused(sessionmaker: Sessionmaker) -> None:
    async with unit_of_work(sessionmaker) as session:
        # A column with a Python-side default (created_at) not given: it would be left
        # out, not computed.
        without_default = {k: v for k, v in _account("acct_1", 0).items() if k != "created_at"}
        with pytest.raises(ValueError, match="created_at"):
            await together.write(
                session,
                [(_ADD_ACCOUNTS, [without_default]), (_ADD_ENTRIES, [_entry("a", None, 1)])],
            )
        # An UPDATE's rows must give its bound parameters, no more and no fewer.
        with pytest.raises(ValueError, match="b_delta"):
            await together.write(
                session,
                [
                    (_ADD_ACCOUNTS, [_account("acct_1", 0)]),
                    (_CHANGE_BALANCE, [{"b_account": "acct_1"}]),
                ],
            )


@pytest.mark.parametrize("then", ["insert", "update"])
async def test_write_if_writes_only_after_the_first_statement_acted(
    engine: AsyncEngine, sessionmaker: Sessionmaker, then: str
) -> None:
    """`write_if`: the second write only where the first returned a row (an inbox record
    made now); on PostgreSQL the pair is one statement."""
    async with unit_of_work(sessionmaker) as session:
        await together.write(session, [(_ADD_ACCOUNTS, [_account("acct_1", 10)])])
    # The record of an event only while its account exists (`inbox.Condition`).
    exists = select(_ACCOUNTS.c.id).where(_ACCOUNTS.c.id == bindparam("c_account")).exists()
    first = inbox.Condition(exists).statements[engine.dialect.name == "postgresql"]
    seen: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    acted = []
    for n, event_id in enumerate(["evt_1", "evt_1", "evt_2"]):
        writes: together.Write = (
            (_ADD_ACCOUNTS, [_account(f"acct_{event_id}_{n}", 0)])
            if then == "insert"
            else (_CHANGE_BALANCE, [{"b_account": "acct_1", "b_delta": 5}])
        )
        record = {"consumer": "test", "event_id": event_id, "processed_at": _AT}
        record["c_account"] = "acct_1"
        async with unit_of_work(sessionmaker) as session:
            acted.append(await together.write_if(session, first, record, writes))
    statements = [s.split()[0] for s in seen if not s.startswith("BEGIN")]
    async with sessionmaker() as session:
        accounts = dict((await session.execute(select(Account.id, Account.balance))).all())

    assert acted == [True, False, True]  # the event recorded before: nothing written
    if then == "insert":
        assert set(accounts) == {"acct_1", "acct_evt_1_0", "acct_evt_2_2"}
    else:
        assert accounts == {"acct_1": 20}
    if engine.dialect.name == "postgresql":
        assert statements == ["WITH"] * 3
    else:  # the record, and the write only after a record made
        assert statements == ["INSERT", statements[1], "INSERT", "INSERT", statements[1]]
