"""`GET /v1/events`: the account's job results in order, to catch up on missed webhooks."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from aigen.errors import Unprocessable
from aigen.gateway.auth import JobsRead
from aigen.gateway.deps import DepsDep, SessionDep
from aigen.notifications import event_feed
from aigen.notifications.schemas import EventList

from .webhook_deliveries import COMMON_ERRORS

router = APIRouter(prefix="/events", tags=["webhooks"])


@router.get("", response_model=EventList, responses={**COMMON_ERRORS, 422: Unprocessable.schema()})
async def list_events(
    principal: JobsRead,
    session: SessionDep,
    deps: DepsDep,
    after: Annotated[
        str | None,
        Query(
            description="an event id or `next_cursor`: only events after it; none: from the start"
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> EventList:
    """Every job result of the account (`ai_generation.job.completed`, `.failed`,
    `.canceled`), oldest first: the events webhooks announce, whether or not they were
    delivered. Keep `next_cursor` and pass it as `after` to read only what came since;
    an event appears a couple of seconds after it happened."""
    page = await event_feed.read(
        session,
        principal.account_id,
        after=after,
        limit=limit,
        delay=deps.settings.events_feed_delay_seconds,
    )
    return EventList(
        data=page.events, has_more=page.has_more, next_cursor=page.next_cursor or after
    )
