"""The credit ledger (DESIGN §6): integers, append-only, balance == ledger sum.

A job's money moves as `hold` (−worst case) when it is accepted (`lock_balances`, then
`holding` for the jobs that fit; or, for one account, `READ_BALANCES` and
`holding_unless_moved`), then either `release` (+hold) alone, or `release`
(+hold) and `capture` (−actual, never above the hold) in the one transaction that
applies its result. The unique (job, kind) index makes a second application fail
instead of charging twice. Functions take the session first and never commit: the
caller's transaction holds the ledger row together with the state change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import Update

from aigen.clock import utcnow
from aigen.db import driver, together
from aigen.db.base import table
from aigen.errors import NotFound, PaymentRequired
from aigen.models import Account, CreditEntry, Job

# The statements every job runs, built once with bound parameters (building them anew,
# with their cache keys, cost about as much as executing them): Core, not the ORM's
# unit of work, as nothing here needs the rows as objects.
_ENTRIES = table(CreditEntry)
_ACCOUNTS = table(Account)
_ADD_ENTRIES = insert(_ENTRIES)
_CHANGE_BALANCE = (
    update(_ACCOUNTS)
    .where(_ACCOUNTS.c.id == bindparam("b_account"))
    .values(balance=_ACCOUNTS.c.balance + bindparam("b_delta"))
)


class InsufficientCreditsError(PaymentRequired):
    code = "insufficient_credits"
    title = "Not enough credits"


class AccountNotFoundError(NotFound):
    code = "account_not_found"
    title = "Account not found"


async def _move(
    session: AsyncSession,
    *,
    account_id: str,
    amount: int,
    kind: str,
    job_id: str | None = None,
    model: str | None = None,
    note: str | None = None,
) -> CreditEntry:
    entry = CreditEntry(
        account_id=account_id, job_id=job_id, kind=kind, amount=amount, model=model, note=note
    )
    session.add(entry)
    result = await session.execute(
        update(Account).where(Account.id == account_id).values(balance=Account.balance + amount)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise AccountNotFoundError(f"no account {account_id}")
    await session.flush()
    return entry


async def grant(
    session: AsyncSession, account_id: str, amount: int, *, note: str | None = None
) -> CreditEntry:
    """Add credits (a top-up, a promotion); `adjust` covers corrections both ways."""
    if amount <= 0:
        raise ValueError("a grant is a positive number of credits")
    return await _move(session, account_id=account_id, amount=amount, kind="grant", note=note)


async def adjust(session: AsyncSession, account_id: str, amount: int, *, note: str) -> CreditEntry:
    return await _move(session, account_id=account_id, amount=amount, kind="adjust", note=note)


@dataclass(frozen=True, slots=True)
class Hold:
    account_id: str
    job_id: str
    amount: int
    model: str


async def lock_balances(session: AsyncSession, account_ids: Iterable[str]) -> dict[str, int]:
    """The accounts' balances, their rows locked until the transaction ends (PostgreSQL;
    SQLite's writer lock covers the whole transaction). Locked in id order, so that two
    transactions that lock several accounts cannot deadlock on one another.

    `FOR NO KEY UPDATE`, the lock an UPDATE of the balance takes itself: it leaves the
    rows that merely reference an account (jobs, ledger rows, webhook deliveries) free
    to be inserted by other transactions meanwhile. `FOR UPDATE` would also wait for
    those, and deadlock with a consumer that inserts them for several accounts at once.
    """
    rows = await driver.execute(session, LOCK_BALANCES, {"ids": sorted(set(account_ids))})
    return {account_id: int(balance) for account_id, balance, _ in rows.all()}


# `lock_balances`'s statement, (id, balance, intakes) in id order, for a caller that
# sends it with reads of its own (the job service's intake). Every transaction that adds
# jobs counts itself in their account's `intakes` (`holding`), and only those do.
LOCK_BALANCES = (
    select(_ACCOUNTS.c.id, _ACCOUNTS.c.balance, _ACCOUNTS.c.intakes)
    .where(_ACCOUNTS.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(_ACCOUNTS.c.id)
    .with_for_update(key_share=True)
)
# The balances as read without a lock, (id, balance, intakes), for a caller that writes
# its holds only if no intake came between (`holding_unless_moved`; PostgreSQL).
READ_BALANCES = select(_ACCOUNTS.c.id, _ACCOUNTS.c.balance, _ACCOUNTS.c.intakes).where(
    _ACCOUNTS.c.id.in_(bindparam("ids", expanding=True))
)
_HOLD_BALANCE = (
    update(_ACCOUNTS)
    .where(_ACCOUNTS.c.id == bindparam("b_account"))
    .values(balance=_ACCOUNTS.c.balance + bindparam("b_delta"), intakes=_ACCOUNTS.c.intakes + 1)
)
_HOLD_BALANCE_UNLESS_MOVED = (
    update(_ACCOUNTS)
    .where(
        _ACCOUNTS.c.id == bindparam("b_account"),
        _ACCOUNTS.c.intakes == bindparam("b_intakes"),
        _ACCOUNTS.c.balance >= bindparam("b_balance"),
    )
    .values(balance=_ACCOUNTS.c.balance + bindparam("b_delta"), intakes=_ACCOUNTS.c.intakes + 1)
    .returning(_ACCOUNTS.c.id)
)


def short_of_credits(amount: int, balance: int) -> InsufficientCreditsError:
    return InsufficientCreditsError(
        f"this job needs up to {amount} credits and the balance is {balance}",
        extra={"credits_required": amount, "balance": balance},
    )


def holding(holds: Sequence[Hold]) -> list[together.Write]:
    """The writes of the holds that the caller checked against `lock_balances` in this
    transaction: one ledger row each, and one balance update per account. The caller
    sends them (`db.together.write`), with writes of its own."""
    if not holds:
        return []
    # One row per account: `together.write` changes each account's row once.
    totals: dict[str, int] = {}
    for h in holds:
        totals[h.account_id] = totals.get(h.account_id, 0) + h.amount
    balances = [{"b_account": account, "b_delta": -total} for account, total in totals.items()]
    return [_hold_entries(holds), (_HOLD_BALANCE, balances)]


def holding_unless_moved(
    account_id: str, balance: int, intakes: int, holds: Sequence[Hold]
) -> tuple[Update, dict[str, Any], together.Write]:
    """`holding` of one account's holds, checked against its `balance` and `intakes` as
    `READ_BALANCES` read them, without a lock: the balance update, made only where no
    intake came since and the balance is no lower (it then returns the account's id),
    and the ledger rows, for the caller to write only if it acted
    (`together.write_after`).

    Where another intake came between, or the balance fell (a correction), the update
    changes nothing, having waited for that transaction if it still held the row
    (PostgreSQL checks the conditions again on the row's latest version): the caller
    then takes the lock (`lock_balances`) and judges again. Where it acts, the holds fit
    the balance, and no transaction that adds jobs to the account committed since the
    read. A settlement or a top-up between (the balance only rises) lets it act."""
    assert all(h.account_id == account_id for h in holds), "one account's holds"
    params = {
        "b_account": account_id,
        "b_intakes": intakes,
        "b_balance": balance,
        "b_delta": -sum(h.amount for h in holds),
    }
    return _HOLD_BALANCE_UNLESS_MOVED, params, _hold_entries(holds)


def _hold_entries(holds: Sequence[Hold]) -> together.Write:
    now = utcnow()
    entries = [
        {
            "account_id": h.account_id,
            "job_id": h.job_id,
            "kind": "hold",
            "amount": -h.amount,
            "model": h.model,
            "created_at": now,
        }
        for h in holds
    ]
    return (_ADD_ENTRIES, entries)


async def release(session: AsyncSession, job: Job) -> None:
    """Give the whole hold back (failure, cancel before start, expiry)."""
    await _move(
        session,
        account_id=job.account_id,
        amount=job.credits_reserved,
        kind="release",
        job_id=job.id,
        model=job.model,
    )


def settling(job: Job, *, price: int) -> tuple[int, list[together.Write]]:
    """The price to capture, capped at the hold, and the writes that settle the job:
    the release of the hold and the capture in the ledger, then one balance update by
    their sum, last, so that `together.write` counts its row (`settled` checks it)."""
    charged = _capped(job, price)
    change = {"b_account": job.account_id, "b_delta": job.credits_reserved - charged}
    return charged, [(_ADD_ENTRIES, _settlement_entries(job, charged)), (_CHANGE_BALANCE, [change])]


def settled(job: Job, balances_changed: int) -> None:
    """Raise unless `settling`'s balance update, written, found the job's account."""
    if balances_changed != 1:
        raise AccountNotFoundError(f"no account {job.account_id}")


async def settle_many(session: AsyncSession, prices: Sequence[tuple[Job, int]]) -> list[int]:
    """`settle` of several jobs, in two statements for all of them: the balance updates
    (one per account, in id order, as `lock_balances` locks them), then the ledger rows.

    The accounts are not checked: each job's account exists (its foreign key says so),
    and the balances move in the same transaction as the jobs' transitions.
    """
    charges = [_capped(job, price) for job, price in prices]
    totals: dict[str, int] = {}
    for (job, _), charged in zip(prices, charges, strict=True):
        totals[job.account_id] = totals.get(job.account_id, 0) + job.credits_reserved - charged
    await driver.execute(
        session,
        _CHANGE_BALANCE,
        [{"b_account": account_id, "b_delta": totals[account_id]} for account_id in sorted(totals)],
    )
    entries = [
        entry
        for (job, _), charged in zip(prices, charges, strict=True)
        for entry in _settlement_entries(job, charged)
    ]
    await driver.execute(session, _ADD_ENTRIES, entries)
    return charges


def _capped(job: Job, price: int) -> int:
    return max(0, min(price, job.credits_reserved))


def _settlement_entries(job: Job, charged: int) -> list[dict[str, object]]:
    """A settled job's ledger rows: the release of its hold, and the capture if any."""
    entries = [(job.credits_reserved, "release")] + ([(-charged, "capture")] if charged else [])
    now = utcnow()
    return [
        {
            "account_id": job.account_id,
            "job_id": job.id,
            "kind": kind,
            "amount": amount,
            "model": job.model,
            # Given, not the column's default: a statement with Python-side defaults
            # is left to SQLAlchemy's execution (`db.driver`).
            "created_at": now,
        }
        for amount, kind in entries
    ]


async def ledger_sum(session: AsyncSession, account_id: str) -> int:
    total = await session.scalar(
        select(func.coalesce(func.sum(CreditEntry.amount), 0)).where(
            CreditEntry.account_id == account_id
        )
    )
    return int(total or 0)


async def balance(session: AsyncSession, account_id: str) -> int:
    value = await session.scalar(select(Account.balance).where(Account.id == account_id))
    if value is None:
        raise AccountNotFoundError(f"no account {account_id}")
    return int(value)
