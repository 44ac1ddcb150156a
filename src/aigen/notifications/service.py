"""Webhook deliveries: one per (job, event type, target), made inside the caller's transaction.

Targets (DESIGN §7): the job's own `webhook_url` (signed with the account's secret), then
every enabled endpoint of the account subscribed to the event (signed with its own). A
subscription list that is None or empty means every event. Event names match exactly.
Nothing here commits: the caller's unit of work does, together with its own changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.clock import utcnow
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


async def enqueue(session: AsyncSession, *, job: Job, event_type: str) -> list[WebhookDelivery]:
    """Create the deliveries of `event_type` for `job`; returns only the ones created now.

    Idempotent: a redelivered bus event calls this again and creates nothing, thanks to
    the unique (job, event type, target) and `INSERT … ON CONFLICT DO NOTHING`.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    now = utcnow()
    rows: list[dict[str, Any]] = []

    def add(target: str, url: str, endpoint_id: str | None) -> None:
        rows.append(
            {
                "id": new_id("msg"),
                "account_id": job.account_id,
                "endpoint_id": endpoint_id,
                "job_id": job.id,
                "event_type": event_type,
                "target": target,
                "url": url,
                "status": PENDING,
                "attempts": 0,
                "next_attempt_at": now,
                "leased_until": None,
                "created_at": now,
                "delivered_at": None,
            }
        )

    if job.webhook_url and _subscribed(job.webhook_events, event_type):
        add(f"url:{job.webhook_url}", job.webhook_url, None)
    endpoints = await session.scalars(
        select(WebhookEndpoint)
        .where(
            WebhookEndpoint.account_id == job.account_id,
            WebhookEndpoint.disabled_at.is_(None),
        )
        .order_by(WebhookEndpoint.id)
    )
    for endpoint in endpoints:
        if _subscribed(endpoint.events, event_type):
            add(f"endpoint:{endpoint.id}", endpoint.url, endpoint.id)
    if not rows:
        return []

    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = (
        insert(WebhookDelivery)
        .on_conflict_do_nothing(index_elements=["job_id", "event_type", "target"])
        .returning(WebhookDelivery)  # the rows made, as objects: no second read
    )
    created = (await session.scalars(statement, rows)).all()
    order = {row["id"]: index for index, row in enumerate(rows)}
    return sorted(created, key=lambda delivery: order[delivery.id])


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
