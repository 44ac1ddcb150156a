"""What the API's lifespan creates and every request reads (no import-time clients)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from fastapi import Request

from aigen.backend.principal import Principal
from aigen.bootstrap import Deps


@dataclass(frozen=True, slots=True)
class CachedKey:
    principal: Principal | None
    revoked: bool
    expires_at: datetime | None
    suspended: bool
    cached_until: float


class KeyCache:
    """key hash → what the database said about it, for a few seconds."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, CachedKey] = {}

    def get(self, digest: str) -> CachedKey | None:
        entry = self._entries.get(digest)
        if entry is None or entry.cached_until < time.monotonic():
            return None
        return entry

    def put(self, digest: str, entry: CachedKey) -> None:
        if len(self._entries) > 50_000:
            self._entries.clear()
        self._entries[digest] = entry

    def invalidate(self) -> None:
        self._entries.clear()


@dataclass
class AppState:
    deps: Deps
    key_cache: KeyCache
    # Stamps `last_used_at` at most once a minute per key (monotonic seconds).
    key_touched: dict[str, float] = field(default_factory=dict)


def get_state(request: Request) -> AppState:
    state = request.app.state.aigen
    assert isinstance(state, AppState)
    return state
