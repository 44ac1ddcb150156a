"""What the API answers about money: the ledger and usage (DESIGN §3 `GET /v1/usage`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LedgerEntry(BaseModel):
    """One ledger row: `amount` is its signed effect on the balance."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: Literal["grant", "hold", "capture", "release", "adjust"]
    amount: int
    job_id: str | None = None
    model: str | None = None
    note: str | None = None
    created_at: datetime


class UsageTotals(BaseModel):
    jobs: int = 0
    credits_charged: int = 0


class ModelUsage(UsageTotals):
    model: str


class DayUsage(UsageTotals):
    date: str = Field(description="the UTC day, `YYYY-MM-DD`")


class Usage(BaseModel):
    """Jobs accepted and credits charged in `[from, to)`, by model and by UTC day, with the
    ledger entries of that period, newest first, a page at a time."""

    model_config = ConfigDict(populate_by_name=True)

    object: Literal["usage"] = "usage"
    account_id: str
    period_from: datetime = Field(serialization_alias="from")
    period_to: datetime = Field(serialization_alias="to")
    totals: UsageTotals
    by_model: list[ModelUsage]
    by_day: list[DayUsage]
    entries: list[LedgerEntry]
    has_more: bool
    next_cursor: int | None = None
