"""Jobs: acceptance (seed step 4), the state machine (DESIGN §4) and applying results (12).

Every transition is a compare-and-set on `status` (and, for results, on `attempt`), so
whichever of two racing writers comes second changes nothing. Money moves in the same
transaction as the transition that justifies it; events leave through the outbox.
A transition that ends a job is also told, once committed, on the `ENDED` notice channel
(`aigen.db.notices`): the notifier, which races the backend for each result, waits for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    bindparam,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql import CompoundSelect, Select

from aigen.backend.billing import service as billing
from aigen.backend.idempotency import service as idempotency
from aigen.backend.idempotency.service import Claim, StoredResponse
from aigen.backend.principal import Principal
from aigen.bus import inbox, outbox
from aigen.bus.messages import (
    AIGenerationJobCanceled,
    AIGenerationJobCompleted,
    AIGenerationJobFailed,
    AIGenerationJobRequested,
    AssetRef,
    Envelope,
)
from aigen.clock import utcnow
from aigen.db import driver, notices, together
from aigen.db.base import UTCDateTime, as_loaded, build, columns_of, one_of, table
from aigen.db.session import is_postgres
from aigen.errors import AppError, Conflict, NotFound, RateLimited
from aigen.ids import new_id
from aigen.models import Account, Asset, Job
from aigen.models.job import (
    ACTIVE,
    CANCELED,
    COMPLETED,
    EXPIRED,
    FAILED,
    PENDING,
    PROCESSING,
    TERMINAL,
)

_JOBS = table(Job)
# The notice channel of jobs that reached a terminal status (their ids).
ENDED = "aigen_job_ended"


class JobNotFoundError(NotFound):
    code = "job_not_found"
    title = "Job not found"


class JobNotCancelableError(Conflict):
    code = "job_not_cancelable"
    title = "The job has already ended"


class ConcurrencyLimitError(RateLimited):
    code = "concurrency_limit"
    title = "Too many jobs in progress for this key"


@dataclass(frozen=True, slots=True)
class NewJob:
    model: str
    task: str
    input: dict[str, Any]
    hold: int
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    metadata: dict[str, Any] | None = None
    deadline_s: float | None = None
    # Chosen by the caller when it must know the id first (the limiter's reservation).
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    job: Job
    # The key's jobs pending or processing, this one included.
    active: int


@dataclass(frozen=True, slots=True)
class Candidate:
    """One job to accept, as `create_many` takes it: the row (`new_row`) and who asks."""

    principal: Principal
    job: Job
    traceparent: str | None = None
    # With an Idempotency-Key: the claim, and the answer to store with the job.
    claim: Claim | None = None
    answer: StoredResponse | None = None


def new_row(principal: Principal, new: NewJob) -> Job:
    """The job as it will be stored once accepted (not yet added to any session), so that
    the `202` can be rendered before the transaction that stores it."""
    now = utcnow()
    values = {
        "id": new.id or new_id("job"),
        "account_id": principal.account_id,
        "api_key_id": principal.key_id,
        "model": new.model,
        "task": new.task,
        "input": new.input,
        "status": PENDING,
        "attempt": 0,
        "webhook_url": new.webhook_url,
        "webhook_events": new.webhook_events,
        "meta": new.metadata,
        "credits_reserved": new.hold,
        "deadline_at": now + timedelta(seconds=new.deadline_s) if new.deadline_s else None,
        "created_at": now,
        "updated_at": now,
    }
    return build(Job, values)


async def create(
    session: AsyncSession,
    principal: Principal,
    new: NewJob,
    *,
    traceparent: str | None = None,
) -> Accepted:
    """Accept one job in the caller's transaction, or raise 402 / 429 (`create_many`)."""
    job = new_row(principal, new)
    [outcome] = await create_many(session, [Candidate(principal, job, traceparent)])
    if isinstance(outcome, AppError):
        raise outcome
    return outcome


async def create_many(
    session: AsyncSession, candidates: Sequence[Candidate]
) -> list[Accepted | AppError]:
    """Accept jobs (seed step 4): credit hold, concurrency check, job and outbox rows.

    Each candidate is judged on its own, in order, and gets its `Accepted` or the error
    to answer (402 short of credits, which wins over 429 at the concurrency limit, or 409
    for an idempotency claim taken over); the others go on. All of it is one unit of
    work of the caller's: the API accepts the jobs that arrive together in one, so the
    hot rows' locks and the commit are paid once per batch (`gateway.intake`).

    The accounts' rows are locked first, in id order; the counts read after that see
    every job that the transactions before this one committed, so neither the balance
    nor a key's concurrency can be overshot by racing API processes. A key belongs to
    one account, and every job is created here, under its account's lock: that lock
    puts the transactions of a key in line too, so the key's row needs no lock of its
    own (`_lock_and_count`). The jobs of one account, with no idempotency claim to
    complete, go first without the lock, in two statements that commit by themselves
    where the unit comes alone (`_create_unlocked`); only where the account's row moved
    meanwhile are they judged again here.
    """
    account_ids = sorted({s.principal.account_id for s in candidates})
    key_ids = sorted({s.principal.key_id for s in candidates})
    # (Without the lock: one account's row to check, and no claim to complete in the
    # transaction.)
    unlocked = len(account_ids) == 1 and all(c.claim is None for c in candidates)
    if unlocked and is_postgres(session) and not outbox.writes_through(session):
        done = await _create_unlocked(session, candidates, account_ids[0], key_ids)
        if done is not None:
            return done
    balances, active = await _lock_and_count(session, account_ids, key_ids)
    outcomes, accepted = await _judge(session, candidates, balances, active)
    if accepted:
        events = _requested(accepted)
        holds = billing.holding(_holds(accepted))
        jobs: together.Write = (_INSERT_JOBS, [_columns(s.job) for s in accepted])
        if outbox.writes_through(session):
            await together.write(session, [jobs, *holds])
            await outbox.add_many(session, events)
        else:
            # The jobs, their events, the holds and the balances: one statement on
            # PostgreSQL, where each was a round trip under the account's lock.
            await together.write(session, [jobs, outbox.adding(session, events), *holds])
            outbox.added(session, events)
    return outcomes


async def _create_unlocked(
    session: AsyncSession, candidates: Sequence[Candidate], account_id: str, key_ids: list[str]
) -> list[Accepted | AppError] | None:
    """`create_many` of one account's jobs without its lock (PostgreSQL), or None where
    another intake came meanwhile, or the balance fell (nothing written: the caller
    takes the lock).

    Under the lock a lone job was a transaction of five round trips: BEGIN, the lock and
    the count (`_lock_and_count`), the writes, COMMIT. Here the balance, the account's
    count of intakes and the keys' counts are read in one statement, the jobs judged on
    them, and the writes made in one statement only if no intake came since and the
    balance is no lower (`billing.holding_unless_moved`): every transaction that adds
    jobs counts itself in `intakes`, so none added jobs to the account since the read,
    and the holds fit; the judgments stand as they would under the lock. Each statement
    commits by itself when the unit comes alone (`driver.execute`'s `alone`): two round
    trips. A count read may be higher than the latest (a job ended since), and a balance
    lower (a settlement or a top-up since): a refusal on them is one a moment earlier,
    never a key over its limit or an account below zero."""
    rows = await driver.execute(
        session, _READ_UNLOCKED, {"ids": [account_id], "key_ids": key_ids}, alone=True
    )
    balances, active, intakes = _balances_and_counts(rows)
    balances_read = dict(balances)  # (`_judge` takes the holds off as it accepts)
    outcomes, accepted = await _judge(session, candidates, balances, active)
    if not accepted:
        return outcomes
    events = _requested(accepted)
    # (The account was found: a job was accepted.)
    first, params, entries = billing.holding_unless_moved(
        account_id, balances_read[account_id], intakes[account_id], _holds(accepted)
    )
    jobs: together.Write = (_INSERT_JOBS, [_columns(s.job) for s in accepted])
    writes = [jobs, outbox.adding(session, events), entries]
    moved = not (await together.write_after(session, first, params, writes, alone=True)).rows
    if moved:
        return None
    outbox.added(session, events)
    return outcomes


async def _judge(
    session: AsyncSession,
    candidates: Sequence[Candidate],
    balances: dict[str, int],
    active: dict[str, int],
) -> tuple[list[Accepted | AppError], list[Candidate]]:
    """Each candidate's outcome, in order, against the balances and counts (which it
    updates as it accepts); and the accepted. Completes the idempotency claims of those
    that carry one, in the session's transaction."""
    outcomes: list[Accepted | AppError] = []
    accepted: list[Candidate] = []
    for candidate in candidates:
        job, principal = candidate.job, candidate.principal
        balance = balances.get(job.account_id)
        if balance is None:
            outcomes.append(billing.AccountNotFoundError(f"no account {job.account_id}"))
            continue
        if balance < job.credits_reserved:
            outcomes.append(billing.short_of_credits(job.credits_reserved, balance))
            continue
        count = active.get(job.api_key_id, 0) + 1
        if count > principal.concurrency:
            outcomes.append(_over_concurrency(principal))
            continue
        if candidate.claim is not None and candidate.answer is not None:
            answer = candidate.answer
            try:
                await idempotency.complete(
                    session,
                    candidate.claim,
                    status=answer.status,
                    body=answer.body,
                    headers=answer.headers,
                )
            except AppError as error:
                outcomes.append(error)
                continue
        balances[job.account_id] = balance - job.credits_reserved
        active[job.api_key_id] = count
        accepted.append(candidate)
        outcomes.append(Accepted(job, count))
    return outcomes, accepted


def _requested(accepted: Sequence[Candidate]) -> list[Envelope]:
    return [
        Envelope.wrap(
            AIGenerationJobRequested(
                job_id=s.job.id, account_id=s.job.account_id, model=s.job.model, input=s.job.input
            ),
            traceparent=s.traceparent,
        )
        for s in accepted
    ]


def _holds(accepted: Sequence[Candidate]) -> list[billing.Hold]:
    return [
        billing.Hold(s.job.account_id, s.job.id, s.job.credits_reserved, s.job.model)
        for s in accepted
    ]


async def _lock_and_count(
    session: AsyncSession, account_ids: list[str], key_ids: list[str]
) -> tuple[dict[str, int], dict[str, int]]:
    """The accounts' balances, their rows locked (`billing.lock_balances`), and the keys'
    active jobs as counted after the lock.

    A count in the lock's own statement reads that statement's snapshot, taken before
    it waits for the lock: it would miss the jobs of the transaction it waited for. So
    the count was a statement of its own, after the lock. But every transaction that
    adds jobs counts itself in its account's `intakes` (`billing.LOCK_BALANCES`), and a
    locking read returns the row's latest version where a plain read returns the
    snapshot's. On PostgreSQL one statement locks, counts, and compares each account's
    `intakes` in the two versions: where they are the same, no transaction that adds
    jobs to these accounts committed after the snapshot, and the count is the one a
    statement after the lock would make. Only where one changed (the statement waited
    for another intake) are the keys counted again, as before. Under the lock, one
    round trip where there were two."""
    if not is_postgres(session):
        balances = await billing.lock_balances(session, account_ids)
        return balances, await _count_active(session, key_ids)
    rows = await driver.execute(session, _LOCK_AND_COUNT, {"ids": account_ids, "key_ids": key_ids})
    balances, active, unchanged = _balances_and_counts(rows)
    if not all(unchanged.values()):
        active = await _count_active(session, key_ids)
    return balances, active


def _balances_and_counts(
    rows: driver.Rows,
) -> tuple[dict[str, int], dict[str, int], dict[str, Any]]:
    """`_READ_UNLOCKED`'s or `_LOCK_AND_COUNT`'s rows: the balances and the counts by id,
    and what each account's row says of its intakes (their count, or whether it is the
    snapshot's)."""
    balances: dict[str, int] = {}
    active: dict[str, int] = {}
    intakes: dict[str, Any] = {}
    for kind, row_id, number, of_intakes in rows.all():
        if kind == "account":
            balances[row_id], intakes[row_id] = int(number), of_intakes
        else:
            active[row_id] = int(number)
    return balances, active, intakes


async def _count_active(session: AsyncSession, key_ids: list[str]) -> dict[str, int]:
    counts = await driver.execute(session, _ACTIVE_PER_KEY, {"ids": key_ids})
    return {key_id: int(n) for key_id, n in counts.all()}


def _active_per_key(keys: str) -> Select[Any]:
    """The count of each key's active jobs, (key id, count), the ids bound as `keys`."""
    return (
        select(_JOBS.c.api_key_id, func.count().label("active"))
        .where(
            _JOBS.c.api_key_id.in_(bindparam(keys, expanding=True)), one_of(_JOBS.c.status, ACTIVE)
        )
        .group_by(_JOBS.c.api_key_id)
    )


def _with_counts(accounts: Select[Any]) -> CompoundSelect[Any]:
    """`accounts`' rows, ('account', id, balance, what the row says of its intakes), then
    the keys' counts, ('key', id, count, NULL), in one statement (PostgreSQL)."""
    counts = _active_per_key("key_ids").subquery("counts")
    keys = select(literal_column("'key'"), counts.c.api_key_id, counts.c.active, null())
    return union_all(accounts, keys)


# Built once with bound parameters (see `db.base.table`): every batch runs them.
_ACTIVE_PER_KEY = _active_per_key("ids")
# `_create_unlocked`'s read: the account's balance and count of intakes, then its keys'
# counts, in one snapshot.
_SEEN_BALANCES = billing.READ_BALANCES.cte("seen_balances")
_READ_UNLOCKED = _with_counts(select(literal_column("'account'"), *_SEEN_BALANCES.c))
# `_lock_and_count`'s one statement: the locked rows (their latest versions) with
# whether each has the count of intakes of the statement's snapshot, then the keys'
# counts in that snapshot.
_LOCKED = billing.LOCK_BALANCES.cte("locked")
_SEEN = table(Account).alias("seen")
_INTAKES_IN_SNAPSHOT = select(_SEEN.c.intakes).where(_SEEN.c.id == _LOCKED.c.id).scalar_subquery()
_LOCK_AND_COUNT = _with_counts(
    select(
        literal_column("'account'"),
        _LOCKED.c.id,
        _LOCKED.c.balance,
        _LOCKED.c.intakes == _INTAKES_IN_SNAPSHOT,
    )
)
# A new job's columns (what `new_row` sets; the others start NULL), attribute → column.
# In Core: the ORM's bulk INSERT of the same rows cost 5 % of the accept path's CPU.
_NEW_JOB_COLUMNS = {
    attribute: column
    for attribute, column in columns_of(Job).items()
    if attribute
    in {
        *("id", "account_id", "api_key_id", "model", "task", "input", "status", "attempt"),
        *("webhook_url", "webhook_events", "meta", "credits_reserved", "deadline_at"),
        *("created_at", "updated_at"),
    }
}
_INSERT_JOBS = insert(_JOBS)


def _columns(job: Job) -> dict[str, Any]:
    # From the object's dict, as `new_row` left it: not through the mapped attributes.
    values = vars(job)
    return {column: values.get(key) for key, column in _NEW_JOB_COLUMNS.items()}


def _over_concurrency(principal: Principal) -> ConcurrencyLimitError:
    return ConcurrencyLimitError(
        f"this key may have {principal.concurrency} jobs pending or processing at once",
        headers={"Retry-After": "1"},
        extra={"policy": "concurrency", "limit": principal.concurrency},
    )


async def get(session: AsyncSession, job_id: str, *, account_id: str | None = None) -> Job:
    """The job, or 404; with `account_id`, another account's job is 404 too, never 403."""
    job = await session.get(Job, job_id)
    if job is None or (account_id is not None and job.account_id != account_id):
        raise JobNotFoundError(f"no job {job_id}")
    return job


# In Core, each row then the session's object (`as_loaded`), so that it runs on the
# driver (`db.driver`): every webhook of a completed job reads them.
_ASSETS = table(Asset)
_ASSETS_OF = (
    select(*_ASSETS.c).where(_ASSETS.c.job_id == bindparam("job_id")).order_by(_ASSETS.c.index)
)


async def assets_of(session: AsyncSession, job_id: str) -> list[Asset]:
    rows = await driver.execute(session, _ASSETS_OF, {"job_id": job_id})
    return [as_loaded(session, Asset, row) for row in rows.mappings()]


_ASSETS_OF_MANY = (
    select(*_ASSETS.c)
    .where(_ASSETS.c.job_id.in_(bindparam("job_ids", expanding=True)))
    .order_by(_ASSETS.c.job_id, _ASSETS.c.index)
)


async def assets_of_many(session: AsyncSession, job_ids: Sequence[str]) -> dict[str, list[Asset]]:
    """`assets_of` for several jobs in one statement: every job named has an entry."""
    found: dict[str, list[Asset]] = {job_id: [] for job_id in job_ids}
    if found:
        rows = await driver.execute(session, _ASSETS_OF_MANY, {"job_ids": sorted(found)})
        for row in rows.mappings():
            found[row["job_id"]].append(as_loaded(session, Asset, row))
    return found


async def list_for(
    session: AsyncSession,
    account_id: str | None,
    *,
    status: str | None = None,
    before: str | None = None,
    limit: int = 20,
) -> list[Job]:
    """Newest first; `before` is the last id of the previous page (ids sort by time).

    `account_id=None` lists every account's jobs (admin commands only).
    """
    statement = select(Job)
    if account_id is not None:
        statement = statement.where(Job.account_id == account_id)
    if status:
        statement = statement.where(Job.status == status)
    if before:
        statement = statement.where(Job.id < before)
    statement = statement.order_by(Job.id.desc()).limit(limit)
    return list((await session.scalars(statement)).all())


async def queue_position(session: AsyncSession, job: Job) -> int | None:
    if job.status != PENDING:
        return None
    ahead = await session.scalar(
        select(func.count()).select_from(Job).where(Job.status == PENDING, Job.id < job.id)
    )
    return int(ahead or 0)


async def _transition(
    session: AsyncSession,
    job_id: str,
    *,
    source: Sequence[str],
    target: str,
    attempt: int | None = None,
    values: dict[str, Any] | None = None,
) -> Job | None:
    """Compare-and-set `source → target`; None when another writer got there first."""
    statement, params = _transition_of(job_id, source, target, attempt, values)
    job = await _one_job(session, statement, params)
    if job is not None and target in TERMINAL:
        notices.after_commit(session, ENDED, [job_id])
    return job


def _transition_of(
    job_id: str,
    source: Sequence[str],
    target: str,
    attempt: int | None,
    values: dict[str, Any] | None,
) -> tuple[Any, dict[str, Any]]:
    """`_transition`'s statement (`… RETURNING` the job) and its parameters."""
    now = utcnow()
    changes: dict[str, Any] = {"status": target, "updated_at": now, f"{target}_at": now}
    changes.update(values or {})
    nulled = tuple((name, value is None) for name, value in changes.items())
    statement = _transition_statement(tuple(source), attempt is not None, nulled)
    params = {f"new_{name}": value for name, value in changes.items() if value is not None}
    params["job_id"] = job_id
    if attempt is not None:
        params["fence_attempt"] = attempt
    return statement, params


# The compare-and-set statements, built once per shape (sources, the columns set, which
# of them to NULL): the consumers run one per job, and building the statement anew
# (and its cache key) cost about as much as executing it.
@functools.cache
def _transition_statement(
    source: tuple[str, ...], fenced: bool, nulled: tuple[tuple[str, bool], ...]
) -> Any:
    conditions = [_JOBS.c.id == bindparam("job_id"), one_of(_JOBS.c.status, source)]
    if fenced:
        conditions.append(_JOBS.c.attempt == bindparam("fence_attempt"))
    return (
        update(_JOBS)
        .where(*conditions)
        .values(
            {
                # A None is SQL NULL, as a literal: bound, a JSON column would store 'null'.
                columns_of(Job)[name]: null() if is_null else bindparam(f"new_{name}")
                for name, is_null in nulled
            }
        )
        .returning(*_JOBS.c)
    )


async def _one_job(
    session: AsyncSession, statement: Any, params: dict[str, Any], *, alone: bool = False
) -> Job | None:
    """One statement that returns a job's row (an `UPDATE … RETURNING`, a read), in Core:
    the job as stored now (the session's object, `as_loaded`), or None if none matched.
    `alone`: `driver.execute`'s."""
    result = await driver.execute(session, statement, params, alone=alone)
    row = result.one_or_none()
    return as_loaded(session, Job, dict(zip(result.keys, row, strict=True))) if row else None


async def cancel(session: AsyncSession, job_id: str, *, account_id: str) -> Job:
    """Cancel: a pending job is refunded in full; a processing one is stopped and refunded.

    The worker checks between steps, and a result that arrives after the cancel fails its
    compare-and-set and is thrown away, so the hold is released exactly once, here.
    """
    job = await get(session, job_id, account_id=account_id)
    if job.status in TERMINAL:
        raise JobNotCancelableError(f"job {job_id} is already {job.status}")
    canceled = await _transition(
        session, job_id, source=ACTIVE, target=CANCELED, values={"credits_charged": 0}
    )
    if canceled is None:
        current = await get(session, job_id, account_id=account_id)
        raise JobNotCancelableError(f"job {job_id} is already {current.status}")
    await billing.release(session, canceled)
    outbox.add(session, AIGenerationJobCanceled(job_id=job_id, account_id=account_id))
    return canceled


_NOW = bindparam("now", type_=UTCDateTime())


def _claim_statement(*conditions: Any) -> Any:
    return (
        update(_JOBS)
        .where(
            *conditions,
            one_of(_JOBS.c.status, ACTIVE),
            or_(
                _JOBS.c.status != PENDING, _JOBS.c.deadline_at.is_(None), _JOBS.c.deadline_at > _NOW
            ),
        )
        .values(
            status=PROCESSING,
            attempt=_JOBS.c.attempt + 1,
            processing_at=func.coalesce(_JOBS.c.processing_at, _NOW),
            updated_at=_NOW,
        )
        .returning(*_JOBS.c)
    )


_CLAIM = _claim_statement(_JOBS.c.id == bindparam("job_id"))
_CLAIM_UNLESS_RECORDED = _claim_statement(_JOBS.c.id == bindparam("job_id"), inbox.UNRECORDED)
_CLAIM_MANY = _claim_statement(_JOBS.c.id.in_(bindparam("job_ids", expanding=True)))


async def claim(
    session: AsyncSession, job_id: str, *, unless_recorded: tuple[str, str] | None = None
) -> Job | None:
    """The worker's claim: `pending|processing → processing` with the next attempt number.

    A job already processing is claimed again only because its previous holder lost the
    message lease (it died); the bumped attempt makes that holder's late result stale.
    A job whose deadline passed before it started is expired and refunded instead.

    With `unless_recorded` (a consumer and an event id), nothing is claimed once that
    consumer has recorded the event in its inbox (`bus.inbox`): the worker's redelivered
    message of a job it has announced already, whose result must not turn stale.
    """
    params = {"job_id": job_id, "now": utcnow()}
    statement = _CLAIM
    if unless_recorded is not None:
        # In the same statement: one round trip, not a read of the inbox first.
        statement = _CLAIM_UNLESS_RECORDED
        params |= inbox.unrecorded_params(*unless_recorded)
    # The common case in one statement: an active job, not pending past its deadline.
    # It may commit by itself: the claim stands whatever the unit does after it (the
    # expiry below runs only when it changed nothing).
    claimed = await _one_job(session, statement, params, alone=True)
    if claimed is not None:
        return claimed
    job = await session.get(Job, job_id, populate_existing=True)
    if job is not None and job.status == PENDING:
        # (Its deadline has passed: the update above says so. A recorded event is never
        # a pending job's: the worker records it only once it has claimed the job.)
        await expire(session, job)
    return None


async def claim_many(
    session: AsyncSession, claims: Sequence[tuple[str, str]], *, consumer: str
) -> list[Job | None]:
    """`claim` of several jobs, each `(job id, event id)` `unless_recorded` by `consumer`:
    the same outcome as one `claim` after another, in two statements for all of them
    (the consumer's records among the events, then one multi-row claim), not one each.

    What those two leave unclaimed goes through `claim` again, one by one: a job past
    its deadline (expired there), one not active, or a second message for a job that
    the first claimed (it claims it again, as it would one after the other).
    """
    if len(claims) == 1:
        [(job_id, event_id)] = claims
        return [await claim(session, job_id, unless_recorded=(consumer, event_id))]
    recorded = await inbox.recorded(session, consumer, [event_id for _, event_id in claims])
    first: dict[str, int] = {}  # job id → the claim that goes in the multi-row statement
    for number, (job_id, event_id) in enumerate(claims):
        if event_id not in recorded:
            first.setdefault(job_id, number)
    rows = await driver.execute(session, _CLAIM_MANY, {"job_ids": list(first), "now": utcnow()})
    claimed = {row["id"]: as_loaded(session, Job, row) for row in rows.mappings()}
    jobs: list[Job | None] = []
    for number, (job_id, event_id) in enumerate(claims):
        if event_id in recorded:
            jobs.append(None)
        elif first[job_id] == number and job_id in claimed:
            jobs.append(claimed[job_id])
        else:
            jobs.append(await claim(session, job_id, unless_recorded=(consumer, event_id)))
    return jobs


async def expire(session: AsyncSession, job: Job) -> Job | None:
    """`pending → expired`, refunded in full; None when the job had moved on already."""
    expired = await _transition(
        session,
        job.id,
        source=[PENDING],
        target=EXPIRED,
        values={
            "credits_charged": 0,
            "error": {
                "code": "deadline_exceeded",
                "message": "the job's deadline passed before it started",
                "retryable": False,
            },
        },
    )
    if expired is None:
        return None
    await billing.release(session, expired)
    outbox.add(
        session,
        AIGenerationJobFailed(
            job_id=job.id,
            account_id=job.account_id,
            attempt=job.attempt,
            error=dict(expired.error or {}),
            status=EXPIRED,
        ),
    )
    return expired


async def fail(
    session: AsyncSession,
    job: Job,
    error: dict[str, Any],
    *,
    source: Sequence[str] = (PROCESSING, PENDING),
) -> Job | None:
    """Fail a job that no worker will report on (refunded, `apply_failed`) and announce it
    like any other failure (webhook, events). None if it moved on since."""
    failed = AIGenerationJobFailed(
        job_id=job.id, account_id=job.account_id, attempt=job.attempt, error=error
    )
    applied = await apply_failed(session, failed, source=source)
    if applied is not None:
        outbox.add(session, failed)
    return applied


async def fail_lost(session: AsyncSession, job: Job) -> Job | None:
    """`processing → failed` for a job whose worker and message are both gone."""
    lost = {
        "code": "worker_lost",
        "message": "the job stopped running and was not resumed; it was not charged",
        "retryable": True,
    }
    return await fail(session, job, lost, source=[PROCESSING])


# Built once, with bound parameters: the worker asks this of every job it runs.
_STATUS_OF_ATTEMPT = select(_JOBS.c.status).where(
    _JOBS.c.id == bindparam("job_id"), _JOBS.c.attempt == bindparam("attempt")
)


# True while the job's attempt is processing (params: `running_params`), for a
# consumer's record of its result (`inbox.first_time_if`).
RUNNING = inbox.Condition(
    select(_JOBS.c.id)
    .where(
        _JOBS.c.id == bindparam("running_job_id"),
        _JOBS.c.attempt == bindparam("running_attempt"),
        _JOBS.c.status == PROCESSING,
    )
    .exists()
)


def running_params(job_id: str, attempt: int) -> dict[str, Any]:
    return {"running_job_id": job_id, "running_attempt": attempt}


async def running_attempts(session: AsyncSession, job_ids: Sequence[str]) -> dict[str, int]:
    """The attempt now processing of each of `job_ids` that is processing."""
    rows = await driver.execute(session, _RUNNING_ATTEMPTS, {"job_ids": list(job_ids)})
    return {job_id: attempt for job_id, attempt in rows.all()}


_RUNNING_ATTEMPTS = select(_JOBS.c.id, _JOBS.c.attempt).where(
    _JOBS.c.id.in_(bindparam("job_ids", expanding=True)), _JOBS.c.status == PROCESSING
)


async def is_running(session: AsyncSession, job_id: str, attempt: int) -> bool:
    status = await session.scalar(_STATUS_OF_ATTEMPT, {"job_id": job_id, "attempt": attempt})
    return status == PROCESSING


async def set_progress(
    session: AsyncSession, job_id: str, attempt: int, progress: dict[str, Any]
) -> None:
    await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.status == PROCESSING)
        .values(progress=progress, updated_at=utcnow())
    )


async def apply_completed(
    session: AsyncSession,
    message: AIGenerationJobCompleted,
    *,
    price: int | Callable[[Job], int],
) -> Job | None:
    """Seed step 12: record the assets, capture the price and release the rest, once.

    `price` may be a function of the job (its model), called once the job is in hand.
    """
    job = await _transition(
        session,
        message.job_id,
        source=[PROCESSING],
        target=COMPLETED,
        attempt=message.attempt,
        values={"usage": dict(message.usage), "progress": None},
    )
    if job is None:
        return None
    charged, settling = billing.settling(job, price=price(job) if callable(price) else price)
    # The assets, the charge and the settlement: one statement on PostgreSQL.
    changed = await together.write(
        session,
        [
            (_ADD_ASSETS, [_asset_row(job, asset) for asset in message.assets]),
            (_SET_CHARGED, [{"job_id": job.id, "charged": charged}]),
            *settling,
        ],
    )
    billing.settled(job, changed)
    # The object in hand as stored now, without a second UPDATE at the flush.
    set_committed_value(job, "credits_charged", charged)
    return job


_ADD_ASSETS = insert(table(Asset))
_SET_CHARGED = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("job_id"))
    .values(credits_charged=bindparam("charged"))
)


async def apply_completed_recording(
    session: AsyncSession,
    message: AIGenerationJobCompleted,
    *,
    price: Callable[[Job], int],
    record: together.Write,
) -> Job | None:
    """`apply_completed`, with `record` (the consumer's inbox row of the result) written
    only if the result applies: the job if it did, None if not (the job has moved on,
    or the result was applied before).

    A result that comes alone, the common case below the maximum, was a transaction of
    BEGIN, the inbox row, the transition, the settlement and COMMIT. Here the job is
    read first, outside the transaction (`driver.execute`'s `alone`: what is read never
    changes once the job is processing, its model and hold, and the transition checks
    its state again), and its price settled from it; then one statement makes the
    transition and, only if it acted, the record, the assets, the ledger rows and the
    balance (`together.write_after`), and commits by itself when the unit comes alone.
    """
    job = await _one_job(session, _JOB, {"job_id": message.job_id}, alone=True)
    if job is None or job.status != PROCESSING or job.attempt != message.attempt:
        return None
    charged, settling = billing.settling(job, price=price(job))
    values = {"usage": dict(message.usage), "progress": None, "credits_charged": charged}
    statement, params = _transition_of(job.id, [PROCESSING], COMPLETED, message.attempt, values)
    # On PostgreSQL the job's end is told by the statement itself, as it commits: the
    # notifier, which waits for it, hears it a round trip sooner.
    postgres = is_postgres(session)
    if postgres:
        statement = _ending(statement)
    assets = [_asset_row(job, asset) for asset in message.assets]
    done = await together.write_after(
        session, statement, params, [record, (_ADD_ASSETS, assets), *settling], alone=True
    )
    if not done.rows:
        # Raced (canceled, or claimed again): what the caller reads next is read anew.
        session.expunge(job)
        return None
    completed = as_loaded(session, Job, done.mappings()[0])
    notices.after_commit(session, ENDED, [completed.id], sent=postgres)
    return completed


_JOB = select(*_JOBS.c).where(_JOBS.c.id == bindparam("job_id"))


@functools.cache
def _ending(transition: Any) -> Any:
    """A transition's statement that also tells `ENDED` of the job it ends (built once
    per statement, as the transitions are)."""
    return notices.notifying(transition, ENDED, _JOBS.c.id)


async def apply_completed_many(
    session: AsyncSession,
    messages: Sequence[AIGenerationJobCompleted],
    *,
    price: Callable[[Job, AIGenerationJobCompleted], int],
) -> list[Job | None]:
    """`apply_completed` of several results: the same outcome as one after another, in
    five statements for all of them, not five each: the transitions (one multi-row
    compare-and-set), the assets, the balances, the ledger rows, then each job's usage
    and charge.

    A second result for a job of the batch goes through `apply_completed` after them,
    as it would one after the other (and, the job being completed, is stale).
    """
    if len(messages) == 1:
        return [await _apply_one(session, messages[0], price)]
    first: dict[str, int] = {}  # job id → the result that goes in the multi-row statements
    for number, message in enumerate(messages):
        first.setdefault(message.job_id, number)
    fences = [(messages[n].job_id, messages[n].attempt) for n in first.values()]
    rows = await driver.execute(session, _COMPLETE_MANY, {"fences": fences, "now": utcnow()})
    done = {row["id"]: as_loaded(session, Job, row) for row in rows.mappings()}
    applied = [messages[n] for n in first.values() if messages[n].job_id in done]
    if applied:
        await _settle_completed(session, [(done[m.job_id], m) for m in applied], price)
    jobs: list[Job | None] = []
    for number, message in enumerate(messages):
        if first[message.job_id] == number:
            jobs.append(done.get(message.job_id))
        else:
            jobs.append(await _apply_one(session, message, price))
    return jobs


async def _apply_one(
    session: AsyncSession,
    message: AIGenerationJobCompleted,
    price: Callable[[Job, AIGenerationJobCompleted], int],
) -> Job | None:
    return await apply_completed(session, message, price=lambda job: price(job, message))


async def _settle_completed(
    session: AsyncSession,
    completed: Sequence[tuple[Job, AIGenerationJobCompleted]],
    price: Callable[[Job, AIGenerationJobCompleted], int],
) -> None:
    """The rest of `apply_completed_many` for the jobs whose transition it made."""
    notices.after_commit(session, ENDED, [job.id for job, _ in completed])
    assets = [_asset_row(job, asset) for job, message in completed for asset in message.assets]
    if assets:
        await driver.execute(session, _ADD_ASSETS, assets)
    charges = await billing.settle_many(
        session, [(job, price(job, message)) for job, message in completed]
    )
    await driver.execute(
        session,
        _SET_USAGE_AND_CHARGED,
        [
            {"job_id": job.id, "usage": dict(message.usage), "charged": charged}
            for (job, message), charged in zip(completed, charges, strict=True)
        ],
    )
    for (job, message), charged in zip(completed, charges, strict=True):
        set_committed_value(job, "usage", dict(message.usage))
        set_committed_value(job, "credits_charged", charged)


def _asset_row(job: Job, asset: AssetRef) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "index": asset.index,
        "key": asset.key,
        "content_type": asset.content_type,
        "bytes": asset.bytes,
        "sha256": asset.sha256,
        "created_at": utcnow(),  # given: see `billing._settlement_entries`
    }


# `processing → completed` of several jobs, each at its attempt: their usage is set
# after (`_SET_USAGE_AND_CHARGED`, one row each), with the charge it decides.
_COMPLETE_MANY = (
    update(_JOBS)
    .where(
        tuple_(_JOBS.c.id, _JOBS.c.attempt).in_(bindparam("fences", expanding=True)),
        _JOBS.c.status == PROCESSING,
    )
    .values(status=COMPLETED, updated_at=_NOW, completed_at=_NOW, progress=null())
    .returning(*_JOBS.c)
)
_SET_USAGE_AND_CHARGED = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("job_id"))
    .values(usage=bindparam("usage"), credits_charged=bindparam("charged"))
)


async def apply_failed(
    session: AsyncSession,
    message: AIGenerationJobFailed,
    *,
    source: Sequence[str] = (PROCESSING, PENDING),
) -> Job | None:
    """A failed job is never charged: the whole hold goes back."""
    job = await _transition(
        session,
        message.job_id,
        source=source,
        target=FAILED,
        attempt=message.attempt,
        values={"error": dict(message.error), "progress": None, "credits_charged": 0},
    )
    if job is None:
        return None
    await billing.release(session, job)
    return job
