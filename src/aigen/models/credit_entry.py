from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from aigen.clock import utcnow
from aigen.db.base import BigIntPK, Model


class CreditEntry(Model):
    """One append-only ledger row; `amount` is its signed effect on the balance.

    A job's money moves as `hold` (−worst case), then `release` (+the same) and, on
    success, `capture` (−actual price). The partial unique index makes each kind happen
    at most once per job, so a redelivered event can never charge twice.
    """

    __tablename__ = "credit_entries"
    __table_args__ = (
        Index(
            "uq_credit_entries_job_kind",
            "job_id",
            "kind",
            unique=True,
            sqlite_where=text("job_id IS NOT NULL"),
            postgresql_where=text("job_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(String(40), default=None)
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str | None] = mapped_column(String(100), default=None)
    note: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
