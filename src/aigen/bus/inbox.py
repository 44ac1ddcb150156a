"""Consumer-side deduplication: an event is applied once per consumer, by its id.

A row is needed only while its event can still come again: a redelivery after a crash
between a consumer's commit and its ack (at once, when its channel closes), or a relay's
second publication of a row it had sent but not marked (after a lease of seconds). Both
come within minutes, so the backend's sweeper deletes the rows of events older than a
week (`purge`), a batch at a time, by the range of the key that time-ordered event ids
(`ids.new_event_id`) give them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.clock import utcnow
from aigen.db import driver, together
from aigen.db.base import insert_or_skip, table
from aigen.db.session import is_postgres
from aigen.ids import event_id_floor
from aigen.models import InboxMessage

_TABLE = table(InboxMessage)
_COLUMNS = ["consumer", "event_id", "processed_at"]


def _recording(values: Select[Any] | None = None) -> dict[bool, Any]:
    """The record of an inbox row (`db.base.insert_or_skip`, returning its event id): of
    the bound values, or of `values` (`INSERT … SELECT`)."""
    from_select = (_COLUMNS, values) if values is not None else None
    return insert_or_skip(
        _TABLE, ["consumer", "event_id"], _TABLE.c.event_id, from_select=from_select
    )


# The row's values as named parameters, for an `INSERT … SELECT`.
_BOUND = select(*(bindparam(name, type_=_TABLE.c[name].type) for name in _COLUMNS))
# Built once, with bound parameters: every consumer runs this for every event, and
# building the statement anew (and its cache key) cost twice what executing it does.
_RECORD = _recording()
# Several rows on PostgreSQL: from arrays, one statement on the driver (`db.together`).
_RECORD_ARRAYS = _recording(together.rows_of_arrays(_TABLE, _COLUMNS))[True]
_RECORD_BOUND = _recording(_BOUND)[True]
# A condition for a statement of the consumer's own (the worker's claim): true while
# the consumer has not recorded the event, with the parameters of `unrecorded_params`.
UNRECORDED = ~(
    select(_TABLE.c.event_id)
    .where(
        _TABLE.c.consumer == bindparam("inbox_consumer"),
        _TABLE.c.event_id == bindparam("inbox_event_id"),
    )
    .exists()
)


async def first_time(session: AsyncSession, consumer: str, event_id: str) -> bool:
    """Record the event in the caller's transaction; False when it was applied before.

    The row commits (or rolls back) with the consumer's own changes, so "applied" and
    "recorded" can never disagree. One `INSERT … ON CONFLICT DO NOTHING`: a duplicate
    that is still being applied by another transaction makes this one wait for it, and
    then find the row (False) if it committed, or insert it (True) if it rolled back.
    """
    return await _record(session, _RECORD, consumer, event_id, {})


async def first_time_many(
    session: AsyncSession, consumer: str, event_ids: Sequence[str]
) -> set[str]:
    """`first_time` of several events, in one multi-row statement: those recorded now."""
    if not event_ids:
        return set()
    now = utcnow()
    rows = [{"consumer": consumer, "event_id": e, "processed_at": now} for e in event_ids]
    return set((await together.insert_rows(session, _RECORD, _RECORD_ARRAYS, rows)).scalars())


async def recorded(session: AsyncSession, consumer: str, event_ids: Sequence[str]) -> set[str]:
    """Those of `event_ids` that `consumer` has recorded."""
    if not event_ids:
        return set()
    params = {"consumer": consumer, "event_ids": list(event_ids)}
    return set((await driver.execute(session, _RECORDED, params)).scalars())


_RECORDED = select(_TABLE.c.event_id).where(
    _TABLE.c.consumer == bindparam("consumer"),
    _TABLE.c.event_id.in_(bindparam("event_ids", expanding=True)),
)


class Condition:
    """A condition on other tables for `first_time_if`, with the statements built once.

    `where` is a boolean SQL expression with bound parameters (an `EXISTS`), given with
    their values at each call. The consumer's own state check then costs no round trip
    of its own: the record and the check are one `INSERT … SELECT … WHERE`.
    """

    def __init__(self, where: ColumnElement[bool]) -> None:
        self.statements = _recording(_BOUND.where(where))


async def first_time_if(
    session: AsyncSession,
    consumer: str,
    event_id: str,
    condition: Condition,
    params: Mapping[str, Any],
    *,
    then: together.Write | None = None,
    alone: bool = False,
) -> bool:
    """`first_time`, only while `condition` holds (with `params`): False when the event
    was recorded before or the condition is false, and then nothing is recorded.

    `then`: writes made only when the event is recorded now, in the same statement on
    PostgreSQL (`together.write_if`); `alone`: that statement may commit by itself
    (`driver.execute`), when nothing the caller does after it must commit with it."""
    return await _record(
        session, condition.statements, consumer, event_id, params, then=then, alone=alone
    )


async def _record(
    session: AsyncSession,
    statements: dict[bool, Any],
    consumer: str,
    event_id: str,
    params: Mapping[str, Any],
    *,
    then: together.Write | None = None,
    alone: bool = False,
) -> bool:
    statement = statements[is_postgres(session)]
    values = {**params, **_row(consumer, event_id)}
    if then is not None:
        return await together.write_if(session, statement, values, then, alone=alone)
    inserted = await driver.execute(session, statement, values, alone=alone)
    return inserted.scalar() is not None


def record_now(consumer: str, event_id: str) -> tuple[Any, dict[str, Any]]:
    """The record of an event on PostgreSQL, as a statement that returns a row when it is
    made now, and its parameters: the first of `together.rows_if`'s two (an `INSERT …
    SELECT` of named parameters: a CTE's `INSERT … VALUES` would take them unnamed)."""
    return _RECORD_BOUND, _row(consumer, event_id)


def recording(consumer: str, event_id: str) -> together.Write:
    """The record of an event as a write (`db.together`) to make after another statement
    only if that one acts: a plain INSERT, for an event that cannot have been recorded
    if that statement acts (the backend's settlement: a result applied once leaves its
    job no longer processing at its attempt)."""
    return _INSERT, [_row(consumer, event_id)]


_INSERT = insert(_TABLE)


def _row(consumer: str, event_id: str) -> dict[str, Any]:
    """An inbox row's values (`_COLUMNS`), the event recorded now."""
    return {"consumer": consumer, "event_id": event_id, "processed_at": utcnow()}


def unrecorded_params(consumer: str, event_id: str) -> dict[str, str]:
    """The parameters of `UNRECORDED` for one consumer's event."""
    return {"inbox_consumer": consumer, "inbox_event_id": event_id}


async def consumers(session: AsyncSession) -> list[str]:
    """The consumers that have rows: one step of the key's index each (the least name
    after the last), where a `DISTINCT` would read every row."""
    found: list[str] = []
    while True:
        after = found[-1] if found else ""
        name = (await driver.execute(session, _NEXT_CONSUMER, {"after": after})).scalar()
        if name is None:
            return found
        found.append(name)


async def purge(session: AsyncSession, consumer: str, *, before: datetime, limit: int) -> int:
    """Delete up to `limit` of `consumer`'s rows of events made and applied before
    `before`, the oldest first; returns how many.

    The event's id bounds the range of the key to read (ids made before `before` sort
    below its floor); the time it was applied is checked too, so that a row keyed by an
    id that is not time-ordered (a random one, from before event ids were) is deleted
    only once it is as old, and most such rows lie above the floor and are kept."""
    params = {"consumer": consumer, "floor": event_id_floor(before), "before": before}
    return (await driver.execute(session, _PURGE, {**params, "limit": limit})).rowcount


_NEXT_CONSUMER = select(func.min(_TABLE.c.consumer)).where(_TABLE.c.consumer > bindparam("after"))
_OLDEST = (
    select(_TABLE.c.event_id)
    .where(
        _TABLE.c.consumer == bindparam("consumer"),
        _TABLE.c.event_id < bindparam("floor"),
        _TABLE.c.processed_at < bindparam("before"),
    )
    .order_by(_TABLE.c.event_id)
    .limit(bindparam("limit"))
)
_PURGE = delete(_TABLE).where(
    _TABLE.c.consumer == bindparam("consumer"),
    _TABLE.c.event_id.in_(_OLDEST.scalar_subquery()),
)
