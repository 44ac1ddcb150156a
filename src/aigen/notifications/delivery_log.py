"""The delivery log: every message with its attempts, redelivery, and recovery since a time.

Lists are newest first and page by message id (ids sort by creation time). A page's
attempts come in one query. Sending again keeps the message id, which is the
`webhook-id` header, so a receiver that has seen the message can tell.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.clock import utcnow
from aigen.errors import Conflict
from aigen.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

from . import service
from .schemas import Attempt, Delivery
from .service import FAILED, PENDING, WebhookDeliveryNotFound

EXCERPT_CHARS = 1024


class WebhookEndpointDisabledError(Conflict):
    code = "webhook_endpoint_disabled"
    title = "The webhook endpoint is disabled"


async def list_for(
    session: AsyncSession,
    account_id: str,
    *,
    endpoint_id: str | None = None,
    job_id: str | None = None,
    status: str | None = None,
    before: str | None = None,
    limit: int = 20,
) -> list[WebhookDelivery]:
    """The account's messages, newest first, narrowed by endpoint, job and status."""
    statement = select(WebhookDelivery).where(WebhookDelivery.account_id == account_id)
    if endpoint_id is not None:
        statement = statement.where(WebhookDelivery.endpoint_id == endpoint_id)
    if job_id is not None:
        statement = statement.where(WebhookDelivery.job_id == job_id)
    if status is not None:
        statement = statement.where(WebhookDelivery.status == status)
    if before:
        statement = statement.where(WebhookDelivery.id < before)
    statement = statement.order_by(WebhookDelivery.id.desc()).limit(limit)
    return list((await session.scalars(statement)).all())


async def get(session: AsyncSession, delivery_id: str, *, account_id: str) -> WebhookDelivery:
    """The message, or 404 (also when it is another account's)."""
    delivery = await session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.account_id != account_id:
        raise WebhookDeliveryNotFound(f"no webhook delivery {delivery_id}")
    return delivery


async def attempts_of(
    session: AsyncSession, delivery_ids: Sequence[str]
) -> dict[str, list[WebhookAttempt]]:
    """Each message's attempts, oldest first."""
    found: defaultdict[str, list[WebhookAttempt]] = defaultdict(list)
    if delivery_ids:
        rows = await session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(delivery_ids))
            .order_by(WebhookAttempt.id)
        )
        for attempt in rows:
            found[attempt.delivery_id].append(attempt)
    return found


async def redeliver(session: AsyncSession, delivery_id: str, *, account_id: str) -> WebhookDelivery:
    """Send the message again now, from the start of the schedule, with the same id.

    A message to a disabled endpoint is refused (409): enable the endpoint first.
    """
    delivery = await get(session, delivery_id, account_id=account_id)
    if delivery.endpoint_id is not None:
        endpoint = await session.get(WebhookEndpoint, delivery.endpoint_id)
        if endpoint is not None and endpoint.disabled_at is not None:
            raise WebhookEndpointDisabledError(
                f"webhook endpoint {endpoint.id} is disabled; enable it, then redeliver"
            )
    return await service.redeliver(session, delivery_id, account_id=account_id)


async def recover(
    session: AsyncSession,
    endpoint: WebhookEndpoint,
    *,
    since: datetime,
    until: datetime | None = None,
) -> int:
    """Send again every failed message of `endpoint` created in [since, until); how many.

    As `redeliver` does for one: pending now, from the start of the schedule, same ids.
    """
    if endpoint.disabled_at is not None:
        raise WebhookEndpointDisabledError(
            f"webhook endpoint {endpoint.id} is disabled; enable it, then recover"
        )
    conditions = [
        WebhookDelivery.endpoint_id == endpoint.id,
        WebhookDelivery.account_id == endpoint.account_id,
        WebhookDelivery.status == FAILED,
        WebhookDelivery.created_at >= since,
    ]
    if until is not None:
        conditions.append(WebhookDelivery.created_at < until)
    result = await session.execute(
        update(WebhookDelivery)
        .where(*conditions)
        .values(
            status=PENDING,
            attempts=0,
            next_attempt_at=utcnow(),
            delivered_at=None,
            leased_until=None,
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def render(
    delivery: WebhookDelivery, attempts: Sequence[WebhookAttempt], *, full: bool = False
) -> Delivery:
    """The message with its attempts; `full` adds each stored answer whole (up to 20 KB)."""
    return Delivery(
        id=delivery.id,
        endpoint_id=delivery.endpoint_id,
        job_id=delivery.job_id,
        event_type=delivery.event_type,
        url=delivery.url,
        status=delivery.status,
        next_attempt_at=delivery.next_attempt_at if delivery.status == PENDING else None,
        created_at=delivery.created_at,
        delivered_at=delivery.delivered_at,
        attempts=[
            Attempt(
                attempted_at=attempt.attempted_at,
                status_code=attempt.status_code,
                latency_ms=attempt.latency_ms,
                response_excerpt=_excerpt(attempt.response_body),
                response_body=attempt.response_body if full else None,
                error=attempt.error,
            )
            for attempt in attempts
        ],
    )


def _excerpt(body: str | None) -> str | None:
    return body[:EXCERPT_CHARS] if body is not None else None
