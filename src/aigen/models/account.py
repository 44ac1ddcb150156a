from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from aigen.clock import utcnow
from aigen.db.base import Model


class Account(Model):
    """A customer of the platform. `balance` is a cache of the ledger sum, kept in step."""

    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="active")
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    # How many intakes have held credits from the account: the version of the row that
    # the API's intake without the lock checks (`billing.holding_unless_moved`). Only an
    # intake changes it, so a settlement between the intake's read and its write does
    # not send the intake under the lock.
    intakes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Signs deliveries to per-job `webhook_url`s (DESIGN §11); shown by the API on request.
    webhook_secret: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
