"""Who is calling: the verified API key and its account, as the gateway hands it on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    account_id: str
    scopes: frozenset[str]
    rpm: int
    concurrency: int
    jobs_per_day: int | None = None
    jobs_per_month: int | None = None
    credits_per_day: int | None = None
    credits_per_month: int | None = None
    expires_at: datetime | None = None
