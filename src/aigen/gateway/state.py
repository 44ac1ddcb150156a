"""What the API's lifespan creates and every request reads (no import-time clients)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime

from fastapi import FastAPI, Request

from aigen.backend.job import service as job_service
from aigen.backend.principal import Principal
from aigen.bootstrap import Deps
from aigen.db.notices import Listener

from .intake import Intake


@dataclass(frozen=True, slots=True)
class CachedKey:
    principal: Principal | None
    revoked: bool
    expires_at: datetime | None
    suspended: bool
    cached_until: float


class KeyCache:
    """key hash → what the database said about it, for a few seconds.

    `forget` (a revocation notice) bumps a generation; an answer read from the database
    before the notice is then not cached, so it cannot outlive the revocation.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.generation = 0
        self._entries: dict[str, CachedKey] = {}

    def get(self, digest: str) -> CachedKey | None:
        entry = self._entries.get(digest)
        if entry is None or entry.cached_until < time.monotonic():
            return None
        return entry

    def put(self, digest: str, entry: CachedKey, *, generation: int) -> None:
        if generation != self.generation:
            return
        if len(self._entries) > 50_000:
            self._entries.clear()
        self._entries[digest] = entry

    def forget(self, key_id: str | None) -> None:
        """Drop one key (by id), or every key (None)."""
        self.generation += 1
        if key_id is None:
            self._entries.clear()
            return
        for digest in [
            d for d, e in self._entries.items() if e.principal and e.principal.key_id == key_id
        ]:
            del self._entries[digest]

    def invalidate(self) -> None:
        self.forget(None)


@dataclass
class AppState:
    deps: Deps
    key_cache: KeyCache
    # Group commit of accepted jobs (`POST /v1/generate`).
    intake: Intake
    # Hears which jobs ended, for `Prefer: wait` (run by `app.listen`).
    ended: Listener
    # Stamps `last_used_at` at most once a minute per key (monotonic seconds).
    key_touched: dict[str, float] = field(default_factory=dict)
    # One database read per key hash at a time, however many requests arrive at once.
    key_lookups: dict[str, asyncio.Future[CachedKey]] = field(default_factory=dict)

    @classmethod
    def create(cls, deps: Deps) -> AppState:
        return cls(
            deps=deps,
            key_cache=KeyCache(deps.settings.key_cache_seconds),
            intake=Intake(deps),
            ended=Listener(job_service.ENDED, deps.sessionmaker),
        )


def get_state(request: Request) -> AppState:
    return get_app_state(request.app)


def get_app_state(app: FastAPI) -> AppState:
    state = app.state.aigen
    assert isinstance(state, AppState)
    return state
