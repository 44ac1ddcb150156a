from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from aigen.clock import utcnow
from aigen.db.base import Model


class ApiKey(Model):
    """An API key, stored only as HMAC-SHA256 under the server secret (DESIGN §6)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(20))
    last4: Mapped[str] = mapped_column(String(4))
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    scopes: Mapped[str] = mapped_column(String(200), default="generate,read,webhooks")
    rpm: Mapped[int | None] = mapped_column(Integer, default=None)
    concurrency: Mapped[int | None] = mapped_column(Integer, default=None)
    jobs_per_day: Mapped[int | None] = mapped_column(Integer, default=None)
    jobs_per_month: Mapped[int | None] = mapped_column(Integer, default=None)
    credits_per_day: Mapped[int | None] = mapped_column(Integer, default=None)
    credits_per_month: Mapped[int | None] = mapped_column(Integer, default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def scope_list(self) -> list[str]:
        return [s for s in self.scopes.split(",") if s]
