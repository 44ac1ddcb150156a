"""Webhook deliveries: one per (job, event type, target), made inside the caller's transaction.

Targets (DESIGN §7): the job's own `webhook_url` (signed with the account's secret), then
every enabled endpoint of the account subscribed to the event (signed with its own). A
subscription list that is None or empty means every event. Event names match exactly.
Nothing here commits: the caller's unit of work does, together with its own changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.clock import utcnow
from aigen.db import together
from aigen.db.base import as_loaded, insert_or_skip, table
from aigen.errors import NotFound
from aigen.ids import new_id
from aigen.models import Job, WebhookDelivery, WebhookEndpoint

JOB_COMPLETED = "ai_generation.job.completed"
JOB_FAILED = "ai_generation.job.failed"
JOB_CANCELED = "ai_generation.job.canceled"
EVENT_TYPES = (JOB_COMPLETED, JOB_FAILED, JOB_CANCELED)

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"


class WebhookDeliveryNotFound(NotFound):
    code = "webhook_delivery_not_found"
    title = "Webhook delivery not found"


# How many of the deliveries about to be made to lease at once, and until when: the
# dispatcher of the same process takes their first attempts (`handlers`).
Lease = Callable[[int], tuple[int, datetime]]


async def enqueue(
    session: AsyncSession,
    *,
    job: Job,
    event_type: str,
    lease: Lease | None = None,
    endpoints: Sequence[WebhookEndpoint] | None = None,
) -> list[WebhookDelivery]:
    """Create the deliveries of `event_type` for `job`; returns only the ones created now.

    Idempotent: a redelivered bus event calls this again and creates nothing, thanks to
    the unique (job, event type, target) and `INSERT … ON CONFLICT DO NOTHING`.
    With `lease`, the first deliveries are made already leased, their first attempt
    counted (as `repository.claim_due` leaves them): one statement, not two.
    `endpoints`: the account's enabled endpoints in id order (`receiving_events`), when
    the caller has read them already; otherwise they are read here.
    """
    if endpoints is None:
        endpoints = (
            await session.scalars(_ENABLED_ENDPOINTS, {"account_id": job.account_id})
        ).all()
    [created] = await enqueue_many(session, [Event(job, event_type, endpoints, lease)])
    return created


@dataclass(frozen=True, slots=True)
class Event:
    """One event's deliveries to make (`enqueue_many`), with the account's `endpoints`
    that receive events, in id order (`receiving_events`)."""

    job: Job
    event_type: str
    endpoints: Sequence[WebhookEndpoint]
    lease: Lease | None = None


async def enqueue_many(
    session: AsyncSession, events: Sequence[Event]
) -> list[list[WebhookDelivery]]:
    """`enqueue` of several events, in one multi-row statement: for each, the deliveries
    created now. Each event's `lease` is asked in turn, for its own deliveries."""
    now = utcnow()
    rows = [_rows(event, now) for event in events]
    every = [row for event_rows in rows for row in event_rows]
    if not every:
        return [[] for _ in events]
    made = set((await together.insert_rows(session, _INSERT, _INSERT_ARRAYS, every)).scalars())
    # The rows as inserted, in the session as if loaded: no second read, and not the
    # ORM's bulk INSERT, which cost 8 % of the notifier's CPU by itself.
    return [
        [as_loaded(session, WebhookDelivery, row) for row in event_rows if row["id"] in made]
        for event_rows in rows
    ]


async def enqueue_recorded(
    session: AsyncSession,
    event: Event,
    record: tuple[Any, Mapping[str, Any]],
    *,
    alone: bool = False,
) -> list[WebhookDelivery]:
    """`enqueue` of one event, only if `record` (its consumer's inbox row: a statement
    that returns a row when it is made now, `inbox.record_now`) is made now, in one
    statement with it on PostgreSQL (`together.rows_if`), which, `alone`, may commit by
    itself. Returns the deliveries created now. An event with no target records nothing
    either: nothing it does can be done twice."""
    rows = _rows(event, utcnow())
    if not rows:
        return []
    statement, params = record
    made = await together.rows_if(session, statement, params, _insert_if, rows, alone=alone)
    ids = set(made.scalars())
    return [as_loaded(session, WebhookDelivery, row) for row in rows if row["id"] in ids]


def _rows(event: Event, now: datetime) -> list[dict[str, Any]]:
    """The delivery rows of one event: the job's own URL, then the endpoints subscribed."""
    job, event_type = event.job, event.event_type
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    targets: list[tuple[str, str, str | None]] = []
    if job.webhook_url and _subscribed(job.webhook_events, event_type):
        targets.append((f"url:{job.webhook_url}", job.webhook_url, None))
    for endpoint in event.endpoints:
        if _subscribed(endpoint.events, event_type):
            targets.append((f"endpoint:{endpoint.id}", endpoint.url, endpoint.id))
    if not targets:
        return []
    leased, lease_until = event.lease(len(targets)) if event.lease is not None else (0, None)
    return [
        {
            "id": new_id("msg"),
            "account_id": job.account_id,
            "endpoint_id": endpoint_id,
            "job_id": job.id,
            "event_type": event_type,
            "target": target,
            "url": url,
            "status": PENDING,
            "attempts": 1 if number < leased else 0,
            "next_attempt_at": now,
            "leased_until": lease_until if number < leased else None,
            "created_at": now,
            "delivered_at": None,
        }
        for number, (target, url, endpoint_id) in enumerate(targets)
    ]


def receiving_events(account_id: ColumnElement[str]) -> ColumnElement[bool]:
    """Which endpoints receive the account's events: its own, unless disabled. (On the
    table's columns: a Core statement that uses it stays Core, for `db.driver`.)"""
    return and_(_ENDPOINTS.c.account_id == account_id, _ENDPOINTS.c.disabled_at.is_(None))


_ENDPOINTS = table(WebhookEndpoint)


_ENABLED_ENDPOINTS = (
    select(WebhookEndpoint)
    .where(receiving_events(bindparam("account_id")))
    .order_by(WebhookEndpoint.id)
)
# Built once (see `db.base.table`); the ids of the rows made (not those already there).
_DELIVERIES = table(WebhookDelivery)
_CONFLICT = ["job_id", "event_type", "target"]
_INSERT = insert_or_skip(_DELIVERIES, _CONFLICT, _DELIVERIES.c.id)
# Several rows on PostgreSQL: from arrays, one statement on the driver (`db.together`);
# `_rows` gives every column.
_KEYS = tuple(_DELIVERIES.c.keys())
_INSERT_ARRAYS = insert_or_skip(
    _DELIVERIES,
    _CONFLICT,
    _DELIVERIES.c.id,
    from_select=(_KEYS, together.rows_of_arrays(_DELIVERIES, _KEYS)),
)[True]


def _insert_if(acting: ColumnElement[bool]) -> Any:
    """`_INSERT_ARRAYS`, taking its rows only while `acting` (`together.rows_if`)."""
    values = together.rows_of_arrays(_DELIVERIES, _KEYS).where(acting)
    made = insert_or_skip(_DELIVERIES, _CONFLICT, _DELIVERIES.c.id, from_select=(_KEYS, values))
    return made[True]


async def redeliver(
    session: AsyncSession, delivery_id: str, *, account_id: str | None = None
) -> WebhookDelivery:
    """Send a delivery again from the start of the schedule, now (same `webhook-id`).

    With `account_id`, a delivery of another account is not found (404, never 403).
    An attempt already in flight finishes, but its outcome no longer changes the delivery.
    """
    delivery = await session.get(WebhookDelivery, delivery_id, with_for_update=True)
    if delivery is None or (account_id is not None and delivery.account_id != account_id):
        raise WebhookDeliveryNotFound()
    delivery.status = PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = utcnow()
    delivery.delivered_at = None
    await session.flush()
    return delivery


def _subscribed(events: Sequence[str] | None, event_type: str) -> bool:
    return not events or event_type in events
