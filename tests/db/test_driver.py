"""`db.driver.execute`: the same rows, counts, transaction and errors as the session's own
execution, on both databases, without SQLAlchemy's execution."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import bindparam, event, exc, insert, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from aigen.db import driver
from aigen.db.base import table
from aigen.db.errors import unreachable
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import Account, CreditEntry, InboxMessage

_INBOX = table(InboxMessage)
_ACCOUNTS = table(Account)
_ADD_ENTRIES = insert(table(CreditEntry))
# Built once, as the hot statements are (the driver keeps a plan per statement object).
_ADD = insert(_INBOX)
_ADD_RETURNING = insert(_INBOX).returning(_INBOX.c.event_id, _INBOX.c.processed_at)
_OF = (
    select(_INBOX.c.event_id, _INBOX.c.processed_at)
    .where(
        _INBOX.c.consumer == bindparam("consumer"),
        _INBOX.c.event_id.in_(bindparam("ids", expanding=True)),
    )
    .order_by(_INBOX.c.event_id)
)
_TOUCH = (
    update(_INBOX).where(_INBOX.c.consumer == bindparam("who")).values(processed_at=bindparam("at"))
)
_CREDIT = (
    update(_ACCOUNTS)
    .where(_ACCOUNTS.c.id == bindparam("account_id"))
    .values(balance=_ACCOUNTS.c.balance + 5)  # a literal bound in the expression
)
_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _row(event_id: str, at: datetime = _AT) -> dict[str, object]:
    return {"consumer": "test", "event_id": event_id, "processed_at": at}


async def test_rows_and_counts_are_the_sessions(sessionmaker: Sessionmaker) -> None:
    async with unit_of_work(sessionmaker) as session:
        added = await driver.execute(session, _ADD_RETURNING, _row("evt_1"))
        many = await driver.execute(session, _ADD, [_row("evt_2"), _row("evt_3"), _row("evt_4")])
        # Another offset, given to a UTC column: it comes back as the same instant in UTC.
        later = _AT.astimezone(timezone(timedelta(hours=2))) + timedelta(seconds=1)
        touched = await driver.execute(session, _TOUCH, {"who": "test", "at": later})
        found = await driver.execute(
            session, _OF, {"consumer": "test", "ids": ["evt_1", "evt_3", "evt_9"]}
        )
        none = await driver.execute(session, _OF, {"consumer": "other", "ids": ["evt_1"]})

    assert added.all() == [("evt_1", _AT)]
    assert many.rows == []
    assert touched.rowcount == 4
    second = _AT + timedelta(seconds=1)
    assert found.all() == [("evt_1", second), ("evt_3", second)]
    assert found.all()[0][1].tzinfo == UTC
    assert found.scalars() == ["evt_1", "evt_3"]
    assert none.all() == []
    assert none.scalar() is None


# Two lists, a plain parameter between them, a literal bound in the statement.
_OF_EITHER = (
    select(_INBOX.c.event_id)
    .where(
        _INBOX.c.event_id.in_(bindparam("some", expanding=True))
        | _INBOX.c.processed_at.in_(bindparam("times", expanding=True)),
        _INBOX.c.consumer == bindparam("consumer"),
        _INBOX.c.event_id != "evt_none",
    )
    .order_by(_INBOX.c.event_id)
)
_OF_PAIRS = select(_INBOX.c.event_id).where(
    tuple_(_INBOX.c.consumer, _INBOX.c.event_id).in_(bindparam("pairs", expanding=True))
)


async def test_lists_of_every_length_give_the_sessions_rows(sessionmaker: Sessionmaker) -> None:
    # The expanded SQL is kept per set of list lengths: each length, seen again, must
    # still place every value where SQLAlchemy's own expansion does.
    later = _AT + timedelta(hours=1)
    async with unit_of_work(sessionmaker) as session:
        await driver.execute(
            session, _ADD, [_row(f"evt_{n}", _AT + timedelta(hours=n)) for n in range(5)]
        )
    cases = [
        ([], []),
        (["evt_1"], []),
        (["evt_1", "evt_3"], [later]),
        (["evt_0", "evt_2", "evt_9"], [_AT + timedelta(hours=4)]),
        (["evt_2", "evt_4"], [_AT]),
        (["evt_0"], [later, _AT + timedelta(hours=3)]),
        ([], [_AT + timedelta(hours=2)]),
    ]
    pairs = [[("test", "evt_1")], [("test", "evt_2"), ("other", "evt_3"), ("test", "evt_3")]]
    got, expected = [], []
    async with unit_of_work(sessionmaker) as session:
        for some, times in cases * 2:
            params = {"some": some, "times": times, "consumer": "test"}
            got.append((await driver.execute(session, _OF_EITHER, params)).scalars())
            expected.append((await session.execute(_OF_EITHER, params)).scalars().all())
        for each in pairs * 2:
            got.append(
                sorted((await driver.execute(session, _OF_PAIRS, {"pairs": each})).scalars())
            )
            expected.append(sorted((await session.execute(_OF_PAIRS, {"pairs": each})).scalars()))

    assert got == expected
    assert got[:7] == [
        [],
        ["evt_1"],
        ["evt_1", "evt_3"],
        ["evt_0", "evt_2", "evt_4"],
        ["evt_0", "evt_2", "evt_4"],
        ["evt_0", "evt_1", "evt_3"],
        ["evt_2"],
    ]
    assert got[-2:] == [["evt_1"], ["evt_2", "evt_3"]]


async def test_a_literal_in_the_statement_and_python_defaults_are_applied(
    sessionmaker: Sessionmaker,
) -> None:
    async with unit_of_work(sessionmaker) as session:
        session.add(Account(id="acct_1", name="a", balance=10, webhook_secret="s"))
        await session.flush()
        credited = await driver.execute(session, _CREDIT, {"account_id": "acct_1"})
        # No `processed_at`: the column's Python default (`utcnow`) fills it.
        await driver.execute(session, _ADD, {"consumer": "test", "event_id": "evt_1"})
    async with sessionmaker() as session:
        balance = await session.scalar(select(Account.balance))
        stamped = await session.scalar(select(InboxMessage.processed_at))

    assert credited.rowcount == 1
    assert balance == 15
    assert stamped is not None
    assert abs(stamped - datetime.now(UTC)) < timedelta(minutes=1)


async def test_statements_share_the_sessions_transaction(sessionmaker: Sessionmaker) -> None:
    async with sessionmaker() as session:
        await session.begin()
        # Each sees the other's write before the commit: one transaction.
        session.add(InboxMessage(consumer="test", event_id="evt_0", processed_at=_AT))
        await session.flush()
        seen = await driver.execute(session, _OF, {"consumer": "test", "ids": ["evt_0"]})
        await driver.execute(session, _ADD, _row("evt_1"))
        also = await session.scalar(select(_INBOX.c.event_id).where(_INBOX.c.event_id == "evt_1"))
        await session.rollback()
    async with sessionmaker() as session:
        left = (await session.scalars(select(InboxMessage.event_id))).all()

    assert seen.scalars() == ["evt_0"]
    assert also == "evt_1"
    assert left == []  # the driver's insert rolled back with the session's


async def test_each_transaction_of_a_session_has_its_own_connection(
    sessionmaker: Sessionmaker,
) -> None:
    async with sessionmaker() as session:
        await driver.execute(session, _ADD, _row("evt_1"))  # the session begins by itself
        await session.commit()
        # A new transaction, maybe on another connection: not the first one's, now back
        # in the pool, where this insert would commit by itself.
        await driver.execute(session, _ADD, _row("evt_2"))
        await session.rollback()
    async with sessionmaker() as session:
        left = (await session.scalars(select(InboxMessage.event_id))).all()

    assert left == ["evt_1"]


async def test_a_transaction_finds_its_connection_once_alone_statements_too(
    sessionmaker: Sessionmaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit's statements, those that may commit by themselves (`alone`) and then one
    that begins the transaction, take the session's connection once: finding it is two
    of SQLAlchemy's greenlet hops a statement."""
    found: list[int] = []
    connection = AsyncSession.connection

    async def counted(self: AsyncSession, *args: Any, **kwargs: Any) -> Any:
        found.append(1)
        return await connection(self, *args, **kwargs)

    monkeypatch.setattr(AsyncSession, "connection", counted)
    async with unit_of_work(sessionmaker, alone=True) as session:
        await driver.execute(session, _ADD, _row("evt_1"), alone=True)
        await driver.execute(session, _OF, {"consumer": "test", "ids": ["evt_1"]}, alone=True)
        await driver.execute(session, _ADD, _row("evt_2"))
        seen = await driver.execute(session, _OF, {"consumer": "test", "ids": ["evt_2"]})

    assert seen.scalars() == ["evt_2"]
    assert len(found) == 1


async def test_an_orm_statement_gives_the_sessions_objects(sessionmaker: Sessionmaker) -> None:
    async with unit_of_work(sessionmaker) as session:
        await driver.execute(session, _ADD, _row("evt_1"))
        found = await driver.execute(session, select(InboxMessage), {})
        held = await session.get(InboxMessage, ("test", "evt_1"))

    assert found.scalars() == [held]


async def test_a_violated_constraint_is_sqlalchemys_error_and_the_session_recovers(
    sessionmaker: Sessionmaker,
) -> None:
    async with unit_of_work(sessionmaker) as session:
        await driver.execute(session, _ADD, _row("evt_1"))
    with pytest.raises(exc.IntegrityError):
        async with unit_of_work(sessionmaker) as session:
            await driver.execute(session, _ADD, _row("evt_1"))
    async with unit_of_work(sessionmaker) as session:
        await driver.execute(session, _ADD, _row("evt_2"))
    async with sessionmaker() as session:
        rows = (await session.scalars(select(InboxMessage.event_id))).all()

    assert sorted(rows) == ["evt_1", "evt_2"]


async def test_they_run_past_sqlalchemys_execution(
    engine: AsyncEngine, sessionmaker: Sessionmaker
) -> None:
    # SQLAlchemy's cursor events still see every statement; those run on the driver
    # have no execution context.
    seen: list[tuple[str, bool]] = []

    def watch(*args: object) -> None:
        if not str(args[2]).startswith("BEGIN"):  # SQLite's BEGIN IMMEDIATE
            seen.append((str(args[2]).split()[0], args[4] is None))

    async with unit_of_work(sessionmaker) as session:
        session.add(Account(id="acct_1", name="a", balance=10, webhook_secret="s"))
    entries = [
        {"account_id": "acct_1", "kind": "grant", "amount": n, "created_at": _AT} for n in (1, 2)
    ]
    event.listen(engine.sync_engine, "before_cursor_execute", watch)
    async with unit_of_work(sessionmaker) as session:
        await driver.execute(session, _ADD, _row("evt_1"))
        await driver.execute(session, _OF, {"consumer": "test", "ids": ["evt_1"]})
        await driver.execute(session, _ADD, [_row("evt_2"), _row("evt_3")])
        # Rows with a generated key: the implicit RETURNING of one row's key is not
        # made for a list, which the driver therefore runs.
        await driver.execute(session, _ADD_ENTRIES, entries)
        # A list with RETURNING: on PostgreSQL SQLAlchemy's one multi-row statement; on
        # SQLite, where a call is no round trip, one statement a row on the driver.
        many = await driver.execute(session, _ADD_RETURNING, [_row("evt_4"), _row("evt_5")])
    event.remove(engine.sync_engine, "before_cursor_execute", watch)
    async with sessionmaker() as session:
        ledger = (await session.scalars(select(CreditEntry.amount))).all()

    on_driver = [("INSERT", True), ("SELECT", True), ("INSERT", True), ("INSERT", True)]
    if engine.dialect.name == "postgresql":
        assert seen == [*on_driver, ("INSERT", False)]
    else:
        assert seen == [*on_driver, ("INSERT", True)]
    assert sorted(many.scalars()) == ["evt_4", "evt_5"]
    assert sorted(ledger) == [1, 2]


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # a server to lose
async def test_a_lost_connection_is_unreachable_and_the_pool_recovers(
    engine: AsyncEngine, sessionmaker: Sessionmaker
) -> None:
    async with sessionmaker() as session:
        await session.begin()
        await driver.execute(session, _ADD, _row("evt_0"))
        pid = await session.scalar(text("SELECT pg_backend_pid()"))
        async with engine.connect() as other:
            await other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(exc.DBAPIError) as caught:
            await driver.execute(session, _ADD, _row("evt_1"))

    assert unreachable(caught.value)
    async with unit_of_work(sessionmaker) as session:
        await driver.execute(session, _ADD, _row("evt_2"))
    async with sessionmaker() as session:
        assert (await session.scalars(select(InboxMessage.event_id))).all() == ["evt_2"]
