"""`/v1/webhook-deliveries`: every message the account was sent, and sending one again.

Messages to a job's own `webhook_url` have no endpoint: `?job_id=` finds them here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.errors import Conflict, Forbidden, NotFound, RateLimited, Unauthorized
from aigen.gateway.auth import WebhooksWrite
from aigen.gateway.deps import SessionDep
from aigen.models import WebhookDelivery
from aigen.notifications import delivery_log
from aigen.notifications.schemas import Delivery, DeliveryList, DeliveryStatus

router = APIRouter(prefix="/webhook-deliveries", tags=["webhooks"])

COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: Unauthorized.schema(),
    403: Forbidden.schema(),
    429: RateLimited.schema(),
}
DeliveryID = Annotated[str, "a message id, `msg_…` (its `webhook-id` header)"]


async def render_page(
    session: AsyncSession, rows: Sequence[WebhookDelivery], limit: int
) -> DeliveryList:
    """A page of `limit` messages from `rows` (one more row than that means there is more)."""
    page = rows[:limit]
    attempts = await delivery_log.attempts_of(session, [row.id for row in page])
    more = len(rows) > limit
    return DeliveryList(
        data=[delivery_log.render(row, attempts[row.id]) for row in page],
        has_more=more,
        next_cursor=page[-1].id if more else None,
    )


@router.get("", response_model=DeliveryList, responses=COMMON_ERRORS)
async def list_deliveries(
    principal: WebhooksWrite,
    session: SessionDep,
    job_id: Annotated[str | None, Query(description="only this job's messages")] = None,
    endpoint_id: Annotated[str | None, Query(description="only this endpoint's")] = None,
    status: Annotated[DeliveryStatus | None, Query(description="only this status")] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> DeliveryList:
    """The account's messages, to endpoints and to jobs' own `webhook_url`s, newest first,
    each with its attempts."""
    rows = await delivery_log.list_for(
        session,
        principal.account_id,
        job_id=job_id,
        endpoint_id=endpoint_id,
        status=status,
        before=cursor,
        limit=limit + 1,
    )
    return await render_page(session, rows, limit)


@router.get(
    "/{delivery_id}",
    response_model=Delivery,
    responses={**COMMON_ERRORS, 404: NotFound.schema()},
)
async def get(delivery_id: DeliveryID, principal: WebhooksWrite, session: SessionDep) -> Delivery:
    """One message with its attempts, each with the receiver's answer as stored (20 KB)."""
    delivery = await delivery_log.get(session, delivery_id, account_id=principal.account_id)
    attempts = await delivery_log.attempts_of(session, [delivery.id])
    return delivery_log.render(delivery, attempts[delivery.id], full=True)


@router.post(
    "/{delivery_id}/redeliver",
    status_code=202,
    response_model=Delivery,
    responses={**COMMON_ERRORS, 404: NotFound.schema(), 409: Conflict.schema()},
)
async def redeliver(
    delivery_id: DeliveryID, principal: WebhooksWrite, session: SessionDep
) -> Delivery:
    """Send the message again now, from the start of the retry schedule, with the same
    `webhook-id` (receivers that deduplicate will see it as the same message)."""
    delivery = await delivery_log.redeliver(session, delivery_id, account_id=principal.account_id)
    attempts = await delivery_log.attempts_of(session, [delivery.id])
    return delivery_log.render(delivery, attempts[delivery.id])
