"""API-key authentication and per-key limits, as typed FastAPI dependencies.

A verified key is cached for at most `key_cache_seconds` (5 s by default), so a
revocation reaches every API process within that time without a database read per call;
with Redis, a revocation notice (`aigen.broadcast`) drops it from every cache at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import structlog
from fastapi import Depends, Request
from sqlalchemy.exc import SQLAlchemyError

from aigen.backend.key import service as key_service
from aigen.backend.principal import Principal
from aigen.clock import utcnow
from aigen.db.session import unit_of_work
from aigen.errors import Forbidden, Unauthorized
from aigen.models import Account
from aigen.tokens import hash_api_key, looks_like_api_key

from . import admission
from .state import AppState, CachedKey, get_state

log = structlog.get_logger(__name__)

# `last_used_at` is stamped at most this often per key and process: a write per request
# would cost more than the answer it dates.
TOUCH_EVERY_SECONDS = 60.0


class KeyRevokedError(Forbidden):
    code = "key_revoked"
    title = "API key revoked"


class KeyExpiredError(Forbidden):
    code = "key_expired"
    title = "API key expired"


class AccountSuspendedError(Forbidden):
    code = "account_suspended"
    title = "Account suspended"


class InsufficientScopeError(Forbidden):
    code = "insufficient_scope"
    title = "API key lacks the scope"


def _key_from(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    fallback = request.headers.get("x-api-key")
    return fallback.strip() if fallback else None


async def _load(state: AppState, plaintext: str) -> CachedKey:
    settings = state.deps.settings
    async with state.deps.sessionmaker() as session:
        row = await key_service.find(session, plaintext, secret=state.deps.secret)
        account = await session.get(Account, row.account_id) if row else None
    until = time.monotonic() + state.key_cache.ttl
    if row is None or account is None:
        return CachedKey(None, False, None, False, until)
    principal = Principal(
        key_id=row.id,
        account_id=row.account_id,
        scopes=frozenset(row.scope_list),
        rpm=row.rpm or settings.default_rpm,
        concurrency=row.concurrency or settings.default_concurrency,
        jobs_per_day=row.jobs_per_day,
        jobs_per_month=row.jobs_per_month,
        credits_per_day=row.credits_per_day,
        credits_per_month=row.credits_per_month,
        expires_at=row.expires_at,
    )
    return CachedKey(
        principal,
        revoked=row.revoked_at is not None,
        expires_at=row.expires_at,
        suspended=account.status != "active",
        cached_until=until,
    )


async def _lookup(state: AppState, plaintext: str) -> CachedKey:
    digest = hash_api_key(plaintext, secret=state.deps.secret)
    cached = state.key_cache.get(digest)
    if cached is not None:
        return cached
    # A burst of requests with one uncached key makes one database read, not one each.
    pending = state.key_lookups.get(digest)
    if pending is None:
        generation = state.key_cache.generation
        pending = asyncio.ensure_future(_load(state, plaintext))
        state.key_lookups[digest] = pending
        try:
            entry = await asyncio.shield(pending)
        finally:
            state.key_lookups.pop(digest, None)
        state.key_cache.put(digest, entry, generation=generation)
        return entry
    return await asyncio.shield(pending)


async def _touch(state: AppState, key_id: str) -> None:
    now = time.monotonic()
    last = state.key_touched.get(key_id)
    if last is not None and now - last < TOUCH_EVERY_SECONDS:
        return
    if len(state.key_touched) > 50_000:
        state.key_touched.clear()
    state.key_touched[key_id] = now
    try:
        async with unit_of_work(state.deps.sessionmaker) as session:
            await key_service.touch(session, key_id, utcnow())
    except (SQLAlchemyError, OSError) as error:
        # A usage stamp is not worth failing the request for.
        log.warning("key.touch_failed", key_id=key_id, error=repr(error))


class Authenticator:
    """Resolves the caller's key to a `Principal`, checks its scope, counts the request.

    With `count=False` the route counts the request itself (`admission.admit`), together
    with the quotas it takes.
    """

    def __init__(self, *, scope: str, count: bool = True) -> None:
        self.scope = scope
        self.count = count

    async def __call__(self, request: Request) -> Principal:
        state = get_state(request)
        plaintext = _key_from(request)
        if not plaintext:
            raise Unauthorized(
                "send your API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not looks_like_api_key(plaintext):
            raise Unauthorized(
                "this is not an aigen API key", headers={"WWW-Authenticate": "Bearer"}
            )
        entry = await _lookup(state, plaintext)
        principal = entry.principal
        if principal is None:
            raise Unauthorized("unknown API key", headers={"WWW-Authenticate": "Bearer"})
        if entry.revoked:
            raise KeyRevokedError("this API key has been revoked")
        if entry.expires_at is not None and entry.expires_at <= utcnow():
            raise KeyExpiredError("this API key has expired")
        if entry.suspended:
            raise AccountSuspendedError("this account is suspended")
        if self.scope not in principal.scopes:
            raise InsufficientScopeError(f"this API key lacks the `{self.scope}` scope")
        await _touch(state, principal.key_id)
        request.state.principal = principal
        if self.count:
            await admission.admit(request, principal)
        else:
            request.state.uncounted = principal
        return principal


JobsWrite = Annotated[Principal, Depends(Authenticator(scope="generate"))]
# `POST /v1/generate`: the route counts the request with the job's quotas.
JobsCreate = Annotated[Principal, Depends(Authenticator(scope="generate", count=False))]
JobsRead = Annotated[Principal, Depends(Authenticator(scope="read"))]
WebhooksWrite = Annotated[Principal, Depends(Authenticator(scope="webhooks"))]
