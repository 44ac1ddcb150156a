"""Group commit of accepted jobs: many jobs in one transaction, each judged on its own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from aigen.backend.account import service as account_service
from aigen.backend.billing import service as billing
from aigen.backend.job import service as job_service
from aigen.backend.key import service as key_service
from aigen.backend.principal import Principal
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.errors import AppError
from aigen.gateway.intake import Intake
from aigen.models import Job, OutboxMessage
from aigen.models.job import COMPLETED, PENDING, PROCESSING
from tests.fixtures.asyncpg_calls import count_begins
from tests.fixtures.platform import Api


def candidate(who: Principal, hold: int) -> job_service.Candidate:
    new = job_service.NewJob(model="scripted-text", task="text", input={"prompt": "x"}, hold=hold)
    return job_service.Candidate(who, job_service.new_row(who, new))


async def test_each_job_in_a_batch_is_judged_on_its_own(api: Api) -> None:
    rich, poor = await api.customer(credits=100), await api.customer(credits=10)
    narrow = (await api.customer(credits=100)).principal(concurrency=1)
    batch = [
        candidate(poor.principal(), 4),
        candidate(rich.principal(), 50),
        candidate(poor.principal(), 4),
        candidate(poor.principal(), 4),  # 2 credits left: refused
        candidate(narrow, 1),
        candidate(narrow, 1),  # over the key's concurrency: refused
        candidate(poor.principal(), 2),  # fits what is left
    ]
    async with unit_of_work(api.deps.sessionmaker) as session:
        outcomes = await job_service.create_many(session, batch)

    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == [
        "Accepted",
        "Accepted",
        "Accepted",
        "InsufficientCreditsError",
        "Accepted",
        "ConcurrencyLimitError",
        "Accepted",
    ]
    short = outcomes[3]
    assert isinstance(short, AppError)
    assert short.status_code == 402
    assert short.extra == {"credits_required": 4, "balance": 2}
    async with api.deps.sessionmaker() as session:
        assert await billing.balance(session, poor.account_id) == 0
        assert await billing.ledger_sum(session, poor.account_id) == 0
        assert await billing.balance(session, rich.account_id) == 50
        assert await billing.ledger_sum(session, rich.account_id) == 50
        stored = await session.scalar(select(func.count()).select_from(Job))
        events = await session.scalar(select(func.count()).select_from(OutboxMessage))
    assert stored == events == 5


async def test_transactions_racing_for_one_key_never_pass_its_concurrency(api: Api) -> None:
    # As the transactions of several API processes would: each its own connection, all
    # at once. The account's lock, taken first, puts them in line; each then counts the
    # jobs of those before it.
    customer = await api.customer(credits=1000)
    who = customer.principal(concurrency=7)

    async def accept_one() -> Any:
        async with unit_of_work(api.deps.sessionmaker) as session:
            [outcome] = await job_service.create_many(session, [candidate(who, 1)])
        return outcome

    outcomes = await asyncio.gather(*(accept_one() for _ in range(30)))

    kinds = sorted(type(o).__name__ for o in outcomes)
    assert kinds == ["Accepted"] * 7 + ["ConcurrencyLimitError"] * 23
    async with api.deps.sessionmaker() as session:
        stored = await session.scalar(
            select(func.count()).select_from(Job).where(Job.api_key_id == customer.key_id)
        )
        assert stored == 7
        assert await billing.balance(session, customer.account_id) == 1000 - 7


def _kinds(statements: list[str]) -> list[str]:
    """Each statement as its first words (`WITH locked`, …), BEGIN and COMMIT apart."""
    return [
        statement.split("\n")[0].split(" AS ")[0]
        for statement in statements
        if not statement.startswith(("BEGIN", "COMMIT"))
    ]


def _recorded(api: Api) -> list[str]:
    statements: list[str] = []
    event.listen(
        api.deps.engine.sync_engine,
        "before_cursor_execute",
        lambda *args: statements.append(str(args[2])),
    )
    return statements


async def _raced(
    api: Api,
    taker: Principal,
    batch: list[job_service.Candidate],
    statements: list[str],
    *,
    hold: int = 1,
) -> tuple[Any, list[str]]:
    """`batch` accepted while another transaction holds `taker`'s account (it accepts a
    job of `taker`'s, holding `hold`, and commits 0.3 s later): the batch's outcomes and
    statements."""
    holding = asyncio.Event()

    async def first() -> None:
        async with unit_of_work(api.deps.sessionmaker) as session:
            [taken] = await job_service.create_many(session, [candidate(taker, hold)])
            assert isinstance(taken, job_service.Accepted)
            holding.set()
            await asyncio.sleep(0.3)  # the batch waits for the account meanwhile

    async def second() -> Any:
        await holding.wait()
        statements.clear()
        async with unit_of_work(api.deps.sessionmaker, alone=True) as session:
            return await job_service.create_many(session, batch)

    _, outcomes = await asyncio.gather(first(), second())
    return outcomes, _kinds(statements)


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
async def test_the_lock_and_the_count_are_one_statement_unless_the_account_moved(
    api: Api,
) -> None:
    """On PostgreSQL a batch of several accounts' jobs locks the accounts and counts the
    keys' jobs in one statement. Its count reads the snapshot taken before the lock, so
    where an account's row changed meanwhile (here another intake of the key committed
    while the batch waited for the lock) the keys are counted again: that intake's job
    counts, and at a concurrency of 1 the key's job is refused."""
    who = (await api.customer(credits=100)).principal(concurrency=1)
    one, two = [(await api.customer(credits=100)).principal() for _ in range(2)]
    statements = _recorded(api)
    async with unit_of_work(api.deps.sessionmaker) as session:
        quiet = await job_service.create_many(session, [candidate(one, 1), candidate(two, 1)])
    quiet_statements = _kinds(statements)

    outcomes, moved = await _raced(api, who, [candidate(who, 1), candidate(one, 1)], statements)

    assert [type(o).__name__ for o in quiet] == ["Accepted", "Accepted"]
    assert quiet_statements == ["WITH locked", "WITH w0"]  # the lock and count; the writes
    assert [type(o).__name__ for o in outcomes] == ["ConcurrencyLimitError", "Accepted"]
    assert moved == ["WITH locked", "SELECT jobs.api_key_id, count(*)", "WITH w0"]


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
@pytest.mark.parametrize("other_hold", [1, 0])
async def test_one_accounts_jobs_go_without_its_lock_unless_another_intake_came(
    api: Api, monkeypatch: pytest.MonkeyPatch, other_hold: int
) -> None:
    """On PostgreSQL the jobs of one account, alone in their unit of work, are a read and
    one statement that commit by themselves (no BEGIN): the writes are made only if no
    intake came since the read. Where another intake came meanwhile (it committed while
    the writes waited for the account's row; its job held credits or, free, none), they
    write nothing, and the batch goes under the lock: that intake's job counts, at a
    concurrency of 1 the job is refused, and the money is that of the one job accepted."""
    customer = await api.customer(credits=100)
    who = customer.principal(concurrency=1)
    quiet_one = (await api.customer(credits=100)).principal()
    statements = _recorded(api)
    begins = count_begins(monkeypatch)
    async with unit_of_work(api.deps.sessionmaker, alone=True) as session:
        [quiet] = await job_service.create_many(session, [candidate(quiet_one, 7)])
    quiet_statements, quiet_begins = _kinds(statements), len(begins)

    [outcome], moved = await _raced(api, who, [candidate(who, 1)], statements, hold=other_hold)

    assert isinstance(quiet, job_service.Accepted)
    assert (quiet_statements, quiet_begins) == (["WITH seen_balances", "WITH w_first"], 0)
    assert type(outcome).__name__ == "ConcurrencyLimitError"
    assert moved == ["WITH seen_balances", "WITH w_first", "WITH locked"]
    async with api.deps.sessionmaker() as session:
        jobs = await session.scalar(
            select(func.count()).select_from(Job).where(Job.api_key_id == customer.key_id)
        )
        assert jobs == 1
        assert await billing.balance(session, customer.account_id) == 100 - other_hold
        assert await billing.ledger_sum(session, customer.account_id) == 100 - other_hold
        assert await billing.balance(session, quiet_one.account_id) == 93
        assert await billing.ledger_sum(session, quiet_one.account_id) == 93


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
@pytest.mark.parametrize(("change", "locked"), [(5, False), (-5, True)])
async def test_a_balance_that_rose_since_the_read_lets_the_jobs_go_one_that_fell_does_not(
    api: Api, monkeypatch: pytest.MonkeyPatch, change: int, locked: bool
) -> None:
    """Between the intake's read without the lock and its write, another transaction
    changes the balance: a rise (a settlement's release, a top-up) leaves the judgment
    standing and the jobs go as they were judged; a fall (a correction) sends them under
    the lock. Either way the money adds up."""
    customer = await api.customer(credits=100)
    judge = job_service._judge
    judged: list[int] = []

    async def changed_first(*args: Any) -> Any:
        if not judged:  # (the first judgment: on the read without the lock)
            async with unit_of_work(api.deps.sessionmaker) as other:
                await billing.adjust(other, customer.account_id, change, note="meanwhile")
        judged.append(1)
        return await judge(*args)

    monkeypatch.setattr(job_service, "_judge", changed_first)
    statements = _recorded(api)
    async with unit_of_work(api.deps.sessionmaker, alone=True) as session:
        [outcome] = await job_service.create_many(session, [candidate(customer.principal(), 7)])
    ours = [s for s in _kinds(statements) if s.startswith(("WITH", "SELECT jobs"))]

    assert isinstance(outcome, job_service.Accepted)
    assert (ours[-2:] == ["WITH locked", "WITH w0"]) == locked
    assert ours[:2] == ["WITH seen_balances", "WITH w_first"]
    async with api.deps.sessionmaker() as session:
        assert await billing.balance(session, customer.account_id) == 100 + change - 7
        assert await billing.ledger_sum(session, customer.account_id) == 100 + change - 7


async def test_concurrent_accepts_share_transactions(api: Api) -> None:
    customer = await api.customer(credits=1000)
    who = customer.principal()
    commits = 0

    def count(*_: Any) -> None:
        nonlocal commits
        commits += 1

    sync_engine = api.deps.engine.sync_engine
    event.listen(sync_engine, "commit", count)
    try:
        intake = Intake(api.deps)
        accepted = await asyncio.gather(*(intake.create(candidate(who, 3)) for _ in range(50)))
    finally:
        event.remove(sync_engine, "commit", count)

    assert len({a.job.id for a in accepted}) == 50
    assert 1 <= commits < 50
    async with api.deps.sessionmaker() as session:
        assert await billing.balance(session, customer.account_id) == 1000 - 150
        assert await billing.ledger_sum(session, customer.account_id) == 1000 - 150


async def test_an_unreachable_database_fails_the_batch_and_the_jobs_behind_it(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    who = (await api.customer(credits=1000)).principal()
    tried: list[int] = []
    stuck = asyncio.Event()

    async def unreachable(_: Any, candidates: list[Any]) -> list[Any]:
        tried.append(len(candidates))
        await stuck.wait()  # as a connect timeout would
        raise ConnectionResetError("the database went away")

    monkeypatch.setattr(job_service, "create_many", unreachable)
    intake = Intake(api.deps)
    first = asyncio.ensure_future(intake.create(candidate(who, 3)))
    await asyncio.sleep(0.1)  # the first batch is in its transaction
    behind = [asyncio.ensure_future(intake.create(candidate(who, 3))) for _ in range(5)]
    await asyncio.sleep(0.1)
    stuck.set()
    results = await asyncio.gather(first, *behind, return_exceptions=True)

    assert all(isinstance(r, ConnectionResetError) for r in results)
    # The five queued behind were not tried one timeout later: they failed with the first.
    assert tried == [1]


# PostgreSQL's generic plans: the test runs on PostgreSQL only.
@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
async def test_the_concurrency_count_reads_a_keys_active_jobs_not_its_history(
    engine: AsyncEngine, sessionmaker: Sessionmaker
) -> None:
    """After months of use a key has many ended jobs and a few active ones: the count the
    intake makes under the account's lock, for every batch, must read the few. On
    PostgreSQL, on the plan it runs on: asyncpg prepares its statements, and PostgreSQL
    runs a prepared statement on a generic plan (parameters unknown) after its fifth run."""
    async with unit_of_work(sessionmaker) as session:
        account = await account_service.create(session, "old customer", credits=10)
        key, _ = await key_service.create(session, account_id=account.id, secret="s" * 48)
    ended, active = 20_000, 3
    async with engine.begin() as connection:
        for status, count in ((COMPLETED, ended), (PENDING, active - 1), (PROCESSING, 1)):
            await connection.execute(
                text(
                    "INSERT INTO jobs (id, account_id, api_key_id, model, task, input, status,"
                    " attempt, credits_reserved, created_at, updated_at)"
                    " SELECT :status || g, :account, :key, 'm', 'text', '{}', :status, 1, 1,"
                    " now(), now() FROM generate_series(1, :count) g"
                ),
                {"status": status, "account": account.id, "key": key.id, "count": count},
            )
        await connection.execute(text("ANALYZE jobs"))  # what autovacuum does in production
    # The count alone, and with the account's balance: read (`_create_unlocked`) or
    # locked (`_lock_and_count`). (The third column on: the key's count.)
    together = [("account", account.id, 10), ("key", key.id, active)]
    for statement, params, expected in (
        (job_service._ACTIVE_PER_KEY, {"ids": [key.id]}, [(key.id, active)]),
        (job_service._READ_UNLOCKED, {"ids": [account.id], "key_ids": [key.id]}, together),
        (job_service._LOCK_AND_COUNT, {"ids": [account.id], "key_ids": [key.id]}, together),
    ):
        counted, nodes = await _run_generic(engine, statement, params)
        assert [tuple(row)[:3] for row in counted] == expected
        on_jobs = [n for n in nodes if n.get("Relation Name") == "jobs"]
        scans = [n for n in on_jobs if "Scan" in n["Node Type"]]
        read = sum(n["Actual Rows"] * n["Actual Loops"] for n in scans)
        thrown_away = sum(
            n.get("Rows Removed by Filter", 0) + n.get("Rows Removed by Index Recheck", 0)
            for n in on_jobs
        )
        assert (read, thrown_away) == (active, 0), nodes


async def _run_generic(
    engine: AsyncEngine, statement: Any, params: dict[str, Any]
) -> tuple[list[Any], list[dict[str, Any]]]:
    """`statement`'s rows and its plan's nodes, run on a generic plan."""
    compiled = statement.compile(dialect=engine.dialect)
    expanded = compiled.construct_expanded_state(params)
    # The statement's parameters, in order, as literals of EXECUTE (our own names and ids).
    arguments = ", ".join(f"'{value}'" for value in expanded.positional_parameters)
    async with engine.connect() as connection:
        raw = (await connection.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.execute("SET plan_cache_mode = force_generic_plan")
        # A name of its own: asyncpg keeps each EXECUTE's text with its rows' types.
        name = f"counting_{abs(hash(expanded.statement))}"
        await raw.execute(f"PREPARE {name} AS {expanded.statement}")
        run = f"EXECUTE {name}({arguments})"
        async with raw.transaction():  # (a lock is taken only in a transaction)
            plan = await raw.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {run}")  # JSON, decoded
            counted = await raw.fetch(run)
        await raw.execute(f"DEALLOCATE {name}; RESET plan_cache_mode")
    return counted, list(_plan_nodes(plan[0]["Plan"]))


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)
