"""The credit ledger (DESIGN §6): integers, append-only, balance == ledger sum.

A job's money moves as `hold` (−worst case) when it is accepted, then either `release`
(+hold) alone, or `release` (+hold) and `capture` (−actual, never above the hold) in the
one transaction that applies its result. The unique (job, kind) index makes a second
application fail instead of charging twice. Functions take the session first and never
commit: the caller's transaction holds the ledger row together with the state change.
"""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.errors import NotFound, PaymentRequired
from aigen.models import Account, CreditEntry, Job


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


async def hold(
    session: AsyncSession, *, account_id: str, job_id: str, amount: int, model: str
) -> None:
    """Reserve `amount` for a job, or raise 402; one conditional update, so never negative.

    The ledger row is written (flushed) before the update, so that the account row stays
    locked for as short a time as possible; a refusal rolls both back.
    """
    session.add(
        CreditEntry(account_id=account_id, job_id=job_id, kind="hold", amount=-amount, model=model)
    )
    await session.flush()
    result = await session.execute(
        update(Account)
        .where(Account.id == account_id, Account.balance >= amount)
        .values(balance=Account.balance - amount)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        balance = await session.scalar(select(Account.balance).where(Account.id == account_id))
        raise InsufficientCreditsError(
            f"this job needs up to {amount} credits and the balance is {balance or 0}",
            extra={"credits_required": amount, "balance": balance or 0},
        )


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


async def settle(session: AsyncSession, job: Job, *, price: int) -> int:
    """Release the hold and capture the actual price, capped at the hold; returns it."""
    charged = max(0, min(price, job.credits_reserved))
    await release(session, job)
    if charged:
        await _move(
            session,
            account_id=job.account_id,
            amount=-charged,
            kind="capture",
            job_id=job.id,
            model=job.model,
        )
    return charged


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
