"""API-key authentication and per-key limits, as typed FastAPI dependencies.

A verified key is cached for at most `key_cache_seconds` (5 s by default), so a
revocation reaches every API process within that time without a database read per call.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from aigen.backend.key import service as key_service
from aigen.backend.principal import Principal
from aigen.clock import utcnow
from aigen.errors import Forbidden, RateLimited, Unauthorized
from aigen.models import Account
from aigen.tokens import hash_api_key, looks_like_api_key

from .state import AppState, CachedKey, get_state


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


class RequestRateLimitedError(RateLimited):
    code = "rate_limited"
    title = "Too many requests for this key"


def _key_from(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    fallback = request.headers.get("x-api-key")
    return fallback.strip() if fallback else None


async def _lookup(state: AppState, plaintext: str) -> CachedKey:
    digest = hash_api_key(plaintext, secret=state.deps.secret)
    cached = state.key_cache.get(digest)
    if cached is not None:
        return cached
    settings = state.deps.settings
    async with state.deps.sessionmaker() as session:
        row = await key_service.find(session, plaintext, secret=state.deps.secret)
        account = await session.get(Account, row.account_id) if row else None
    if row is None or account is None:
        entry = CachedKey(None, False, None, False, time.monotonic() + state.key_cache.ttl)
    else:
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
        entry = CachedKey(
            principal,
            revoked=row.revoked_at is not None,
            expires_at=row.expires_at,
            suspended=account.status != "active",
            cached_until=time.monotonic() + state.key_cache.ttl,
        )
    state.key_cache.put(digest, entry)
    return entry


class Authenticator:
    """Resolves the caller's key to a `Principal`, checks scope and the request rate."""

    def __init__(self, *, scope: str) -> None:
        self.scope = scope

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
        decision = await state.deps.limiter.hit(principal.key_id, per_minute=principal.rpm)
        headers = decision.headers()
        request.state.response_headers = headers
        if not decision.allowed:
            retry_after = str(max(1, int(decision.retry_after + 0.999)))
            raise RequestRateLimitedError(
                f"more than {principal.rpm} requests per minute for this key",
                headers={**headers, "Retry-After": retry_after},
                extra={"policy": decision.policy},
            )
        request.state.principal = principal
        return principal


JobsWrite = Annotated[Principal, Depends(Authenticator(scope="generate"))]
JobsRead = Annotated[Principal, Depends(Authenticator(scope="read"))]
WebhooksWrite = Annotated[Principal, Depends(Authenticator(scope="webhooks"))]
