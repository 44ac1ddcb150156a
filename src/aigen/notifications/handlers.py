"""The notifier's event consumer (seed steps 13–14) and the webhook payload (step 15).

A result event becomes one durable `WebhookDelivery` per target, in the consumer's
transaction with its inbox row; the dispatcher then sends them on the stored schedule.
The payload is built from the job as the backend recorded it, so the notifier waits
(a short `Retry`) until the backend has applied the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.backend.job import service as job_service
from aigen.backend.job import views
from aigen.bus import inbox
from aigen.bus.broker import Handler, Retry
from aigen.bus.messages import Envelope
from aigen.clock import utcnow
from aigen.config import Settings
from aigen.db import driver
from aigen.db.base import as_loaded, table
from aigen.db.group import GroupCommit
from aigen.db.session import Sessionmaker, is_postgres
from aigen.models import Account, Asset, Job, WebhookDelivery, WebhookEndpoint
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
    transaction, and its statements (`GroupCommit.run_batched`).
    """
    group = GroupCommit(sessionmaker)

    async def enqueue(session: AsyncSession, events: Sequence[_Event]) -> list[Enqueued | None]:
        return await _enqueue_many(session, events, dispatcher)

    async def handle(envelope: Envelope) -> None:
        event = _Event(envelope)
        try:
            enqueued = await group.run_batched(enqueue, event)
        except BaseException:
            if dispatcher is not None:
                dispatcher.unreserve(event.reserved)
            raise
        if enqueued is None:
            raise Retry(wait_seconds, "job not yet terminal")
        if dispatcher is not None:
            # Also when none was made (they existed already): the reserved slots go back.
            dispatcher.hand(enqueued.handed, reserved=event.reserved)
            if len(enqueued.handed) < enqueued.created:
                dispatcher.wake()  # the rest: at its next claim, now rather than at the poll
        log.info("notifier.enqueued", job_id=envelope.job_id, deliveries=enqueued.created)

    return handle


@dataclass(slots=True)
class _Event:
    """An event being enqueued, and the dispatcher's slots reserved for its deliveries."""

    envelope: Envelope
    reserved: int = 0


async def _enqueue_many(
    session: AsyncSession, events: Sequence[_Event], dispatcher: Dispatcher | None
) -> list[Enqueued | None]:
    """The deliveries of several events, in three statements for all of them (their jobs
    and targets, the inbox rows, the deliveries), and each new leased delivery prepared
    for the dispatcher: per event, None while its job has not ended (nothing written).
    """
    if dispatcher is not None:
        # A unit of work may run twice (`GroupCommit`): only the last run's
        # reservations stand.
        for event in events:
            dispatcher.unreserve(event.reserved)
            event.reserved = 0
    alone = len(events) == 1 and is_postgres(session)
    assets: dict[str, list[Asset]] | None = {} if alone else None
    found = await _jobs_and_targets(
        session, [e.envelope.job_id for e in events], alone=alone, assets=assets
    )
    targets = [found.get(e.envelope.job_id or "", _NOTHING) for e in events]
    # An event whose job the backend has not ended yet (it often races this very event)
    # writes nothing, and its caller asks again shortly.
    ended = [n for n, (job, _, _) in enumerate(targets) if job is None or job.status in EVENT_TYPES]
    if assets is not None and ended and targets[0][0] is not None:
        return [await _enqueue_alone(session, events[0], targets[0], dispatcher, assets)]
    fresh = await inbox.first_time_many(session, CONSUMER, [events[n].envelope.id for n in ended])
    new: list[int] = []  # the events recorded now, each once however often it came
    for n in ended:
        if targets[n][0] is not None and events[n].envelope.id in fresh:
            fresh.discard(events[n].envelope.id)
            new.append(n)
    made = await service.enqueue_many(
        session, [_deliveries(events[n], targets[n], dispatcher) for n in new]
    )
    created = dict(zip(new, made, strict=True))
    handed: dict[int, list[tuple[repository.Claim, Prepared]]] = {}
    if dispatcher is not None:
        handed = await _prepare_leased(session, dispatcher, created, targets)
    return [
        Enqueued(len(created.get(n, [])), handed.get(n, [])) if n in ended else None
        for n in range(len(events))
    ]


async def _enqueue_alone(
    session: AsyncSession,
    event: _Event,
    targets: Targets,
    dispatcher: Dispatcher | None,
    assets: dict[str, list[Asset]],
) -> Enqueued:
    """`_enqueue_many` of an event that comes alone (most of them below the maximum),
    whose job has ended, on PostgreSQL; `assets`: its job's, read with it. After the read
    of the job and its targets, that was a transaction of BEGIN, the inbox row, the
    deliveries, the payload's assets and COMMIT. Here the inbox row and the deliveries
    are one statement (`service.enqueue_recorded`: the deliveries made only with the
    row), which commits by itself when the unit comes alone, as the read before it may
    (`driver.execute`'s `alone`); the assets came with the read (a job's assets are
    written with its completion, and never change after it)."""
    record = inbox.record_now(CONSUMER, event.envelope.id)
    deliveries = _deliveries(event, targets, dispatcher)
    made = await service.enqueue_recorded(session, deliveries, record, alone=True)
    if dispatcher is None:
        return Enqueued(len(made), [])
    handed = await _prepare_leased(session, dispatcher, {0: made}, [targets], assets=assets)
    return Enqueued(len(made), handed.get(0, []))


async def _prepare_leased(
    session: AsyncSession,
    dispatcher: Dispatcher,
    created: dict[int, list[WebhookDelivery]],
    targets: Sequence[Targets],
    *,
    assets: dict[str, list[Asset]] | None = None,
) -> dict[int, list[tuple[repository.Claim, Prepared]]]:
    """Each event's new leased deliveries, prepared for the dispatcher; the assets of
    their completed jobs are read in one statement for all of them, not one per payload,
    unless given (`assets`: read with the jobs)."""
    leased = {
        n: [delivery for delivery in deliveries if delivery.leased_until is not None]
        for n, deliveries in created.items()
    }
    completed = [
        job.id
        for n, deliveries in leased.items()
        if deliveries and (job := targets[n][0]) is not None and job.status == COMPLETED
    ]
    if assets is None:
        assets = await job_service.assets_of_many(session, completed) if completed else {}
    handed: dict[int, list[tuple[repository.Claim, Prepared]]] = {}
    with views.preloaded_assets(session, assets):
        for n, deliveries in leased.items():
            for delivery in deliveries:
                claim = repository.Claim(delivery.id, delivery.attempts)
                message = await dispatcher.prepare(session, delivery, account=targets[n][1])
                handed.setdefault(n, []).append((claim, message))
    return handed


def _deliveries(event: _Event, targets: Targets, dispatcher: Dispatcher | None) -> service.Event:
    """What to enqueue for an event whose job has ended, leasing what the dispatcher takes."""
    job, _, endpoints = targets
    assert job is not None
    lease = _lease(dispatcher, event) if dispatcher is not None else None
    return service.Event(job, EVENT_TYPES[job.status], endpoints, lease)


def _lease(dispatcher: Dispatcher, event: _Event) -> service.Lease:
    def take(wanted: int) -> tuple[int, datetime]:
        """The dispatcher's free slots for this event's deliveries (`service.Lease`)."""
        event.reserved = dispatcher.reserve(wanted)
        return event.reserved, dispatcher.lease_until(utcnow())

    return take


# The jobs, their accounts and the accounts' endpoints that receive events, in one
# statement: the account's webhook secret signs the deliveries to the job's own URL, and
# the endpoints are the other targets. In Core, each row's columns cut by table into the
# session's objects (`as_loaded`), so that it runs on the driver (`db.driver`), not
# through the ORM's loading of three entities a row.
_TABLES = (table(Job), table(Account), table(WebhookEndpoint), table(Asset))
_JOBS_AND_TARGETS = (
    select(*(column for t in _TABLES[:3] for column in t.c))
    .join_from(_TABLES[0], _TABLES[1], _TABLES[1].c.id == _TABLES[0].c.account_id)
    .outerjoin(_TABLES[2], service.receiving_events(_TABLES[0].c.account_id))
    .where(_TABLES[0].c.id.in_(bindparam("ids", expanding=True)))
    .order_by(_TABLES[0].c.id, _TABLES[2].c.id)
)
# The same with each job's assets (a row per endpoint and asset: few of each), for the
# payload of an event that comes alone: one round trip fewer before its webhook.
_JOBS_TARGETS_AND_ASSETS = (
    _JOBS_AND_TARGETS.add_columns(*_TABLES[3].c)
    .outerjoin(_TABLES[3], _TABLES[3].c.job_id == _TABLES[0].c.id)
    .order_by(_TABLES[3].c.index)
)
_KEYS = [[column.key for column in t.c] for t in _TABLES]
Targets = tuple[Job | None, Account | None, list[WebhookEndpoint]]
_NOTHING: Targets = (None, None, [])


async def _jobs_and_targets(
    session: AsyncSession,
    job_ids: Sequence[str | None],
    *,
    alone: bool = False,
    assets: dict[str, list[Asset]] | None = None,
) -> dict[str, Targets]:
    """Each job found, with its account and the account's endpoints that receive events
    (`alone`: `driver.execute`'s, for a read outside the transaction); and into `assets`,
    when given, each job's assets (a job read completed has all of them: the backend
    writes them in the statement that completes it)."""
    ids = sorted({job_id for job_id in job_ids if job_id is not None})
    found: dict[str, Targets] = {}
    if not ids:
        return found
    statement = _JOBS_AND_TARGETS if assets is None else _JOBS_TARGETS_AND_ASSETS
    rows = await driver.execute(session, statement, {"ids": ids}, alone=alone)
    endpoints: set[tuple[str, str]] = set()  # (job, endpoint)
    held: set[int] = set()
    for row in rows.all():
        job_row, account_row, endpoint_row, *with_asset = _cut(row)
        job_id = job_row["id"]
        if job_id not in found:
            job = as_loaded(session, Job, job_row)
            found[job_id] = (job, as_loaded(session, Account, account_row), [])
        # (The outer joins' rows of NULLs: none; each endpoint and asset comes once per
        # asset and endpoint.)
        endpoint_id = endpoint_row["id"]
        if endpoint_id is not None and (job_id, endpoint_id) not in endpoints:
            endpoints.add((job_id, endpoint_id))
            found[job_id][2].append(as_loaded(session, WebhookEndpoint, endpoint_row))
        if assets is not None:
            listed = assets.setdefault(job_id, [])
            [asset_row] = with_asset
            if asset_row["id"] is not None and asset_row["id"] not in held:
                held.add(asset_row["id"])
                listed.append(as_loaded(session, Asset, asset_row))
    return found


def _cut(row: Sequence[Any]) -> list[dict[str, Any]]:
    """A row of `_JOBS_AND_TARGETS` (or with the assets) as each table's columns by key."""
    cut, start = [], 0
    for keys in _KEYS:
        if start >= len(row):
            break
        cut.append(dict(zip(keys, row[start : start + len(keys)], strict=True)))
        start += len(keys)
    return cut


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
