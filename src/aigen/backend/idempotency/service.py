"""Idempotency keys (DESIGN §3): the first response to a key is kept 24 h and replayed.

`claim` inserts the key as "in flight" in a short transaction of its own (INSERT … ON
CONFLICT DO NOTHING), so exactly one of many concurrent requests with one key owns it.
The owner's job transaction then stores the response with `complete`, atomically with the
job; if that transaction fails, `abandon` deletes the claim so that a retry can proceed.
A claim whose owner died (in flight for longer than `IN_FLIGHT_TIMEOUT`) may be taken
over; `complete` matches the owner's token, so only one of them can ever finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.clock import utcnow
from aigen.db.session import is_postgres
from aigen.errors import Conflict, Unprocessable
from aigen.models import IdempotencyKey

TTL = timedelta(hours=24)
# Longer than any job transaction takes; a claim older than this has lost its owner.
IN_FLIGHT_TIMEOUT = timedelta(seconds=30)


class IdempotencyKeyReusedError(Unprocessable):
    code = "idempotency_key_reused"
    title = "Idempotency-Key already used with another request"


class IdempotencyKeyInFlightError(Conflict):
    code = "idempotency_key_in_flight"
    title = "A request with this Idempotency-Key is still in progress"
    retryable = True


@dataclass(frozen=True, slots=True)
class Claim:
    """This request owns the key; `token` proves it."""

    api_key_id: str
    key: str
    token: datetime


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    body: str
    headers: dict[str, str]


async def claim(
    session: AsyncSession, *, api_key_id: str, key: str, request_hash: str
) -> Claim | StoredResponse:
    """Own `key` for this request, or get the response stored for it; 409 or 422 else."""
    now = utcnow()
    insert = postgresql.insert if is_postgres(session) else sqlite.insert
    inserted = await session.scalar(
        insert(IdempotencyKey)
        .values(
            api_key_id=api_key_id,
            key=key,
            request_hash=request_hash,
            created_at=now,
            expires_at=now + TTL,
        )
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.key)
    )
    if inserted is not None:
        return Claim(api_key_id, key, now)
    row = await session.get(IdempotencyKey, (api_key_id, key), populate_existing=True)
    abandoned = row is not None and (
        row.expires_at <= now
        or (row.response_status is None and row.created_at <= now - IN_FLIGHT_TIMEOUT)
    )
    if row is None or abandoned:
        return await _take_over(session, api_key_id, key, request_hash, row, now)
    if row.request_hash != request_hash:
        raise IdempotencyKeyReusedError(
            "this Idempotency-Key was first used with a different request body; "
            "use a new key for a new request"
        )
    if row.response_status is None or row.response_body is None:
        raise IdempotencyKeyInFlightError(
            "the first request with this Idempotency-Key has not finished; retry shortly",
            headers={"Retry-After": "1"},
        )
    return StoredResponse(row.response_status, row.response_body, dict(row.response_headers or {}))


async def _take_over(
    session: AsyncSession,
    api_key_id: str,
    key: str,
    request_hash: str,
    row: IdempotencyKey | None,
    now: datetime,
) -> Claim:
    values = {
        "request_hash": request_hash,
        "response_status": None,
        "response_body": None,
        "response_headers": None,
        "created_at": now,
        "expires_at": now + TTL,
    }
    if row is None:
        # Abandoned and deleted between our insert and our read: insert again, once.
        session.add(IdempotencyKey(api_key_id=api_key_id, key=key, **values))
        await session.flush()
        return Claim(api_key_id, key, now)
    result = await session.execute(
        update(IdempotencyKey)
        .where(*_pk(api_key_id, key), IdempotencyKey.created_at == row.created_at)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise IdempotencyKeyInFlightError(
            "another request with this Idempotency-Key is in progress; retry shortly",
            headers={"Retry-After": "1"},
        )
    return Claim(api_key_id, key, now)


async def complete(
    session: AsyncSession, owned: Claim, *, status: int, body: str, headers: dict[str, str]
) -> None:
    """Store the response for replays, in the caller's transaction; 409 if not the owner."""
    result = await session.execute(
        update(IdempotencyKey)
        .where(*_pk(owned.api_key_id, owned.key), IdempotencyKey.created_at == owned.token)
        .values(response_status=status, response_body=body, response_headers=headers)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise IdempotencyKeyInFlightError(
            "this Idempotency-Key was taken over by another request",
            headers={"Retry-After": "1"},
        )


async def abandon(session: AsyncSession, owned: Claim) -> None:
    """Give up an in-flight claim (the job was not accepted): a retry starts afresh."""
    await session.execute(
        delete(IdempotencyKey).where(
            *_pk(owned.api_key_id, owned.key),
            IdempotencyKey.created_at == owned.token,
            IdempotencyKey.response_status.is_(None),
        )
    )


async def purge_expired(session: AsyncSession, *, now: datetime | None = None) -> int:
    result = await session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.expires_at <= (now or utcnow()))
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def find(session: AsyncSession, *, api_key_id: str, key: str) -> IdempotencyKey | None:
    return await session.scalar(select(IdempotencyKey).where(*_pk(api_key_id, key)))


def _pk(api_key_id: str, key: str) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    return (IdempotencyKey.api_key_id == api_key_id, IdempotencyKey.key == key)
