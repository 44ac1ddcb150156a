"""`/v1/webhooks`: endpoints, their delivery logs and recovery (DESIGN §3, §7).

This router also carries `/v1/webhook-deliveries` and `/v1/events` (their own modules),
so the app includes one router for the whole of webhooks.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from aigen.errors import Conflict, NotFound, Unprocessable
from aigen.gateway.auth import WebhooksWrite
from aigen.gateway.deps import DepsDep, SessionDep
from aigen.gateway.json_body import require_json
from aigen.notifications import delivery_log
from aigen.notifications import endpoint_service as endpoints
from aigen.notifications.schemas import (
    DeliveryList,
    DeliveryStatus,
    Endpoint,
    EndpointCreate,
    EndpointList,
    EndpointUpdate,
    EndpointWithSecret,
    Recovery,
    RecoveryCreate,
)

from . import events, webhook_deliveries
from .webhook_deliveries import COMMON_ERRORS, render_page

router = APIRouter(prefix="/v1")
endpoint_router = APIRouter(prefix="/webhooks", tags=["webhooks"])

EndpointID = Annotated[str, "a webhook endpoint id, `ep_…`"]
NOT_FOUND: dict[int | str, dict[str, Any]] = {**COMMON_ERRORS, 404: NotFound.schema()}


@endpoint_router.post(
    "",
    status_code=201,
    response_model=EndpointWithSecret,
    responses={**COMMON_ERRORS, 409: Conflict.schema(), 422: Unprocessable.schema()},
    dependencies=[require_json],
)
async def create(
    body: EndpointCreate, principal: WebhooksWrite, session: SessionDep, deps: DepsDep
) -> EndpointWithSecret:
    """Subscribe a URL to job events. The answer carries the endpoint's signing secret
    (`whsec_…`) once: keep it. A URL the SSRF guard refuses (private, loopback, link-local
    addresses and the like; `http` when https is required) is a `422`."""
    endpoint = await endpoints.create(session, principal.account_id, body, settings=deps.settings)
    return endpoints.render_with_secret(endpoint)


@endpoint_router.get("", response_model=EndpointList, responses=COMMON_ERRORS)
async def list_endpoints(
    principal: WebhooksWrite,
    session: SessionDep,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> EndpointList:
    """The account's endpoints, newest first, a page at a time."""
    rows = await endpoints.list_for(session, principal.account_id, before=cursor, limit=limit + 1)
    page = rows[:limit]
    more = len(rows) > limit
    return EndpointList(
        data=[endpoints.render(row) for row in page],
        has_more=more,
        next_cursor=page[-1].id if more else None,
    )


@endpoint_router.get("/{endpoint_id}", response_model=Endpoint, responses=NOT_FOUND)
async def get(endpoint_id: EndpointID, principal: WebhooksWrite, session: SessionDep) -> Endpoint:
    """One endpoint: URL, event filter, whether it is enabled and why not."""
    return endpoints.render(
        await endpoints.get(session, endpoint_id, account_id=principal.account_id)
    )


@endpoint_router.patch(
    "/{endpoint_id}",
    response_model=Endpoint,
    responses={**NOT_FOUND, 422: Unprocessable.schema()},
    dependencies=[require_json],
)
async def update(
    endpoint_id: EndpointID,
    body: EndpointUpdate,
    principal: WebhooksWrite,
    session: SessionDep,
    deps: DepsDep,
) -> Endpoint:
    """Change the URL, the event filter or the description; fields left out keep their
    value. Pending messages go to the new URL from their next attempt."""
    endpoint = await endpoints.update(
        session, endpoint_id, body, account_id=principal.account_id, settings=deps.settings
    )
    return endpoints.render(endpoint)


@endpoint_router.delete("/{endpoint_id}", status_code=204, responses=NOT_FOUND)
async def delete(
    endpoint_id: EndpointID, principal: WebhooksWrite, session: SessionDep
) -> Response:
    """Remove the endpoint. Its pending messages fail at their next attempt."""
    await endpoints.delete(session, endpoint_id, account_id=principal.account_id)
    return Response(status_code=204)


@endpoint_router.post("/{endpoint_id}/disable", response_model=Endpoint, responses=NOT_FOUND)
async def disable(
    endpoint_id: EndpointID, principal: WebhooksWrite, session: SessionDep
) -> Endpoint:
    """Stop sending to the endpoint; its pending messages fail at their next attempt.
    (An endpoint that answers `410` or fails for 5 days is disabled the same way.)"""
    endpoint = await endpoints.set_enabled(
        session, endpoint_id, account_id=principal.account_id, enabled=False
    )
    return endpoints.render(endpoint)


@endpoint_router.post("/{endpoint_id}/enable", response_model=Endpoint, responses=NOT_FOUND)
async def enable(
    endpoint_id: EndpointID, principal: WebhooksWrite, session: SessionDep
) -> Endpoint:
    """Send to the endpoint again; past failures are forgotten. Messages that failed while
    it was disabled can be sent again with `POST /v1/webhooks/{id}/recover`."""
    endpoint = await endpoints.set_enabled(
        session, endpoint_id, account_id=principal.account_id, enabled=True
    )
    return endpoints.render(endpoint)


@endpoint_router.post(
    "/{endpoint_id}/rotate-secret", response_model=EndpointWithSecret, responses=NOT_FOUND
)
async def rotate_secret(
    endpoint_id: EndpointID, principal: WebhooksWrite, session: SessionDep
) -> EndpointWithSecret:
    """A new signing secret, shown once. For 24 hours every message is signed with the old
    and the new secret (`webhook-signature: v1,… v1,…`), so receivers switch at leisure."""
    endpoint = await endpoints.rotate_secret(session, endpoint_id, account_id=principal.account_id)
    return endpoints.render_with_secret(endpoint)


@endpoint_router.get("/{endpoint_id}/deliveries", response_model=DeliveryList, responses=NOT_FOUND)
async def deliveries(
    endpoint_id: EndpointID,
    principal: WebhooksWrite,
    session: SessionDep,
    status: Annotated[DeliveryStatus | None, Query(description="only this status")] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> DeliveryList:
    """The endpoint's messages, newest first, each with its attempts (time, status code,
    latency, the answer's first 1 KiB, error) and the time of its next attempt."""
    await endpoints.get(session, endpoint_id, account_id=principal.account_id)
    rows = await delivery_log.list_for(
        session,
        principal.account_id,
        endpoint_id=endpoint_id,
        status=status,
        before=cursor,
        limit=limit + 1,
    )
    return await render_page(session, rows, limit)


@endpoint_router.post(
    "/{endpoint_id}/recover",
    status_code=202,
    response_model=Recovery,
    responses={**NOT_FOUND, 409: Conflict.schema()},
    dependencies=[require_json],
)
async def recover(
    endpoint_id: EndpointID, body: RecoveryCreate, principal: WebhooksWrite, session: SessionDep
) -> Recovery:
    """Send again every message to this endpoint that failed, created since `since` (and
    before `until`, if given): each restarts its schedule now, with the same `webhook-id`.
    A disabled endpoint is refused (`409`): enable it first."""
    since, until = _utc(body.since), _utc(body.until) if body.until else None
    endpoint = await endpoints.get(session, endpoint_id, account_id=principal.account_id)
    count = await delivery_log.recover(session, endpoint, since=since, until=until)
    return Recovery(endpoint_id=endpoint.id, since=since, until=until, recovered=count)


def _utc(value: datetime) -> datetime:
    # A time without an offset is taken as UTC, as every time this API gives is.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


router.include_router(endpoint_router)
router.include_router(webhook_deliveries.router)
router.include_router(events.router)
