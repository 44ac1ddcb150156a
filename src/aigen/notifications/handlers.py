"""The notifier's event consumer (seed steps 13–14) and the webhook payload (step 15).

A result event becomes one durable `WebhookDelivery` per target, in the consumer's
transaction with its inbox row; the dispatcher then sends them on the stored schedule.
The payload is built from the job as the backend recorded it, so the notifier waits
(a short `Retry`) until the backend has applied the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.backend.job import views
from aigen.bus import inbox
from aigen.bus.broker import Handler, Retry
from aigen.bus.messages import Envelope
from aigen.clock import utcnow
from aigen.config import Settings
from aigen.db.group import GroupCommit
from aigen.db.session import Sessionmaker
from aigen.models import Account, Job, WebhookDelivery, WebhookEndpoint
from aigen.models.job import CANCELED, COMPLETED, EXPIRED, FAILED
from aigen.storage.base import AssetStore

from . import repository, service
from .dispatcher import Dispatcher, Prepared

CONSUMER = "notifications"
EVENT_TYPES = {
    COMPLETED: "ai_generation.job.completed",
    FAILED: "ai_generation.job.failed",
    EXPIRED: "ai_generation.job.failed",
    CANCELED: "ai_generation.job.canceled",
}
log = structlog.get_logger(__name__)


def make_handler(
    sessionmaker: Sessionmaker,
    *,
    wait_seconds: float = 0.2,
    dispatcher: Dispatcher | None = None,
) -> Handler:
    """Turns a job's terminal event into webhook deliveries.

    With the `dispatcher` of the same process, the deliveries it has room for are made
    leased, prepared in this transaction and handed to it once committed: their first
    attempt starts at once, without a claim and a second read. The rest wait for its
    next claim, which the commit wakes. A crash in between loses nothing: the lease runs
    out and a later claim makes the attempt. The events that arrive together share one
    transaction (`GroupCommit`).
    """
    group = GroupCommit(sessionmaker)

    async def handle(envelope: Envelope) -> None:
        reserved = 0

        def take(wanted: int) -> tuple[int, datetime]:
            """The dispatcher's free slots for this event's deliveries (`service.Lease`)."""
            nonlocal reserved
            assert dispatcher is not None
            reserved = dispatcher.reserve(wanted)
            return reserved, dispatcher.lease_until(utcnow())

        async def enqueue(session: AsyncSession) -> Enqueued | None:
            nonlocal reserved
            if dispatcher is not None:
                # A unit of work may run twice (`GroupCommit`): only the last run's
                # reservation stands.
                dispatcher.unreserve(reserved)
                reserved = 0
            job, account, endpoints = await _job_and_targets(session, envelope.job_id)
            if job is not None and job.status not in EVENT_TYPES:
                # The backend has not applied the result yet (it often races this very
                # event): nothing is written, and the caller asks again shortly.
                return None
            if not await inbox.first_time(session, CONSUMER, envelope.id) or job is None:
                return Enqueued(0, [])
            event_type = EVENT_TYPES[job.status]
            created = await service.enqueue(
                session,
                job=job,
                event_type=event_type,
                lease=take if dispatcher else None,
                endpoints=endpoints,
            )
            handed: list[tuple[repository.Claim, Prepared]] = []
            if dispatcher is not None:
                for delivery in created:
                    if delivery.leased_until is not None:
                        claim = repository.Claim(delivery.id, delivery.attempts)
                        message = await dispatcher.prepare(session, delivery, account=account)
                        handed.append((claim, message))
            return Enqueued(len(created), handed)

        try:
            enqueued = await group.run(enqueue)
        except BaseException:
            if dispatcher is not None:
                dispatcher.unreserve(reserved)
            raise
        if enqueued is None:
            raise Retry(wait_seconds, "job not yet terminal")
        if dispatcher is not None:
            # Also when none was made (they existed already): the reserved slots go back.
            dispatcher.hand(enqueued.handed, reserved=reserved)
            if len(enqueued.handed) < enqueued.created:
                dispatcher.wake()  # the rest: at its next claim, now rather than at the poll
        log.info("notifier.enqueued", job_id=envelope.job_id, deliveries=enqueued.created)

    return handle


# The job, its account and the account's endpoints that receive events, in one statement:
# the account's webhook secret signs the deliveries to the job's own URL, and the
# endpoints are the other targets.
_JOB_AND_TARGETS = (
    select(Job, Account, WebhookEndpoint)
    .join(Account, Account.id == Job.account_id)
    .outerjoin(WebhookEndpoint, service.receiving_events(Job.account_id))
    .where(Job.id == bindparam("id"))
    .order_by(WebhookEndpoint.id)
)


async def _job_and_targets(
    session: AsyncSession, job_id: str | None
) -> tuple[Job | None, Account | None, list[WebhookEndpoint]]:
    if job_id is None:
        return None, None, []
    rows = (await session.execute(_JOB_AND_TARGETS, {"id": job_id})).all()
    if not rows:
        return None, None, []
    job, account, _ = rows[0]
    return job, account, [endpoint for *_, endpoint in rows if endpoint is not None]


@dataclass(frozen=True, slots=True)
class Enqueued:
    """How many deliveries an event made, and those leased and prepared for the dispatcher."""

    created: int
    handed: list[tuple[repository.Claim, Prepared]]


def make_payload_builder(store: AssetStore, settings: Settings) -> Any:
    """`{type, timestamp, data: {job}}` with asset URLs minted at each attempt."""

    async def build(session: AsyncSession, delivery: WebhookDelivery) -> dict[str, Any]:
        job = await session.get(Job, delivery.job_id)
        assert job is not None
        rendered = await views.render(
            session,
            job,
            store=store,
            base_url=settings.public_url,
            url_ttl=settings.asset_url_ttl_seconds,
            with_queue_position=False,
            # Only a completed job has assets: the others need no query for them.
            with_assets=job.status == COMPLETED,
        )
        return {
            "type": delivery.event_type,
            "timestamp": utcnow().isoformat(),
            "data": rendered.model_dump(mode="json", exclude={"queue_position"}),
        }

    return build
