"""Database steps of the dispatcher: claim due deliveries, apply an attempt's outcome.

A claim leases the delivery and counts the attempt in one transaction (`FOR UPDATE SKIP
LOCKED` on PostgreSQL; SQLite's `BEGIN IMMEDIATE` serialises claims), so several notifier
processes never make the same attempt. The attempt count taken at claim time is the fence
of the outcome: if the lease ran out and another notifier claimed the delivery again (or
it was redelivered), the late outcome is logged as an attempt but changes nothing else.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.db import driver, together
from aigen.db.base import table, unleased
from aigen.models import WebhookDelivery

from .service import DELIVERED, PENDING


@dataclass(frozen=True, slots=True)
class Claim:
    """A leased delivery; `attempt` is its attempt count with this attempt included."""

    id: str
    attempt: int


async def claim_due(
    session: AsyncSession,
    *,
    limit: int,
    now: datetime,
    lease_until: datetime,
    alone: bool = False,
) -> list[Claim]:
    """Lease up to `limit` due deliveries until `lease_until`, oldest due first: taken,
    leased and counted in one statement (which, `alone`, may commit by itself:
    `driver.execute`)."""
    params = {"limit": limit, "now": now, "lease_until": lease_until}
    rows = await driver.execute(session, _CLAIM_DUE, params, alone=alone)
    # RETURNING keeps no order: the oldest due first, as they were chosen.
    return [Claim(id=id_, attempt=attempts) for _, id_, attempts in sorted(rows.all())]


async def settle(session: AsyncSession, claim: Claim, **values: Any) -> bool:
    """Apply `values` to the claimed delivery unless it was claimed again since; True if applied."""
    params = {f"new_{name}": value for name, value in values.items()}
    params.update(delivery_id=claim.id, claimed_attempt=claim.attempt)
    settled = await driver.execute(session, _settle_statement(tuple(values)), params)
    return settled.scalar() is not None


async def settle_delivered(
    session: AsyncSession,
    claims: Sequence[Claim],
    now: datetime,
    *,
    before: Sequence[together.Write] = (),
    alone: bool = False,
) -> set[str]:
    """`settle` of several claims as delivered at `now`, in one statement: the ids of
    those applied (the others were claimed again since). `before`: writes to make before
    it, in the same statement on PostgreSQL (the attempts' rows); `alone`: they may all
    commit by themselves (`together.write_rows`)."""
    rows = [{"d_id": claim.id, "d_attempt": claim.attempt, "d_now": now} for claim in claims]
    writes = [*before, (_SETTLE_DELIVERED, rows)]
    settled = await together.write_rows(session, writes, alone=alone)
    return set(settled.scalars()) if claims else set()


_DELIVERIES = table(WebhookDelivery)
_DUE = (
    select(_DELIVERIES.c.id)
    .where(
        _DELIVERIES.c.status == PENDING,
        _DELIVERIES.c.next_attempt_at <= bindparam("now"),
        unleased(_DELIVERIES.c.leased_until, bindparam("now")),
    )
    .order_by(_DELIVERIES.c.next_attempt_at)
    .limit(bindparam("limit"))
    # Several notifiers claim at once (PostgreSQL): each takes rows nobody else holds.
    .with_for_update(skip_locked=True)
)
_CLAIM_DUE = (
    update(_DELIVERIES)
    .where(_DELIVERIES.c.id.in_(_DUE))
    .values(leased_until=bindparam("lease_until"), attempts=_DELIVERIES.c.attempts + 1)
    .returning(_DELIVERIES.c.next_attempt_at, _DELIVERIES.c.id, _DELIVERIES.c.attempts)
)
# A row per claim (`db.together`): the delivery, unless claimed again since.
_SETTLE_DELIVERED = (
    update(_DELIVERIES)
    .where(
        _DELIVERIES.c.id == bindparam("d_id"),
        _DELIVERIES.c.attempts == bindparam("d_attempt"),
        _DELIVERIES.c.status == PENDING,
    )
    .values(
        status=DELIVERED, delivered_at=bindparam("d_now"), next_attempt_at=None, leased_until=None
    )
    .returning(_DELIVERIES.c.id)
)


# Built once per set of columns (three: delivered, retry, failed): every attempt ends
# with one (see `db.base.table`).
@functools.cache
def _settle_statement(columns: tuple[str, ...]) -> Any:
    return (
        update(_DELIVERIES)
        .where(
            _DELIVERIES.c.id == bindparam("delivery_id"),
            _DELIVERIES.c.attempts == bindparam("claimed_attempt"),
            _DELIVERIES.c.status == PENDING,
        )
        .values(leased_until=None, **{name: bindparam(f"new_{name}") for name in columns})
        .returning(_DELIVERIES.c.id)
    )


def disabled(now: datetime, reason: str) -> dict[str, Any]:
    """An endpoint's values once disabled; its pending deliveries fail when next claimed."""
    return {"disabled_at": now, "disabled_reason": reason[:200], "updated_at": now}
