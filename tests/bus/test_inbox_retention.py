"""Consumers' inbox rows are kept a week, then the backend's sweeper deletes them by the
range of their time-ordered event ids; an event that can still come again is never
forgotten."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from aigen import ids
from aigen.backend import sweeper
from aigen.bus import inbox
from aigen.bus.messages import Envelope
from aigen.clock import utcnow
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import InboxMessage

from .test_rabbitmq import eventually

WEEK_AND_A_DAY = timedelta(days=8)


def made_at(at: datetime) -> str:
    """An event id as `new_event_id` makes it at `at`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ids.time, "time", at.timestamp)
        return ids.new_event_id()


def test_event_ids_are_version_7_uuids_that_sort_by_the_time_they_were_made() -> None:
    start = utcnow()
    times = [start + timedelta(milliseconds=step) for step in (0, 1, 2, 1000, 86_400_000)]
    made = [made_at(at) for at in times]

    assert sorted(made) == made
    for event_id, at in zip(made, times, strict=True):
        value = uuid.UUID(event_id)
        assert (value.version, value.variant) == (7, uuid.RFC_4122)
        assert value.hex == event_id  # 32 lowercase hex digits, as the envelope carries
        assert ids.event_id_floor(at) <= event_id
        assert event_id < ids.event_id_floor(at + timedelta(milliseconds=1))
    assert len({made_at(start) for _ in range(1000)}) == 1000  # random within a millisecond
    assert uuid.UUID(Envelope(type="AIGenerationJobCanceled", data={}).id).version == 7


async def _add(sessionmaker: Sessionmaker, rows: list[tuple[str, str, datetime]]) -> None:
    async with unit_of_work(sessionmaker) as session:
        for consumer, event_id, processed_at in rows:
            session.add(
                InboxMessage(consumer=consumer, event_id=event_id, processed_at=processed_at)
            )


async def _kept(sessionmaker: Sessionmaker) -> set[tuple[str, str]]:
    async with sessionmaker() as session:
        rows = await session.execute(select(InboxMessage.consumer, InboxMessage.event_id))
        return {(consumer, event_id) for consumer, event_id in rows}


async def test_the_sweep_deletes_the_rows_of_events_older_than_a_week_and_only_those(
    sessionmaker: Sessionmaker,
) -> None:
    now = utcnow()
    old = now - WEEK_AND_A_DAY
    old_events = {c: made_at(old) for c in ("backend", "notifications", "workflow")}
    recent = made_at(now - timedelta(days=6))
    # Made a week ago but applied only now (it waited out an outage in its queue): it
    # can still come again, so its row stays its week.
    late = made_at(old)
    # Random ids from before event ids were time-ordered, both below the retention's
    # floor (as a random id now and then is): the one applied long ago goes, the one
    # applied just now stays.
    random_low, random_low_new = ("00" + uuid.uuid4().hex[2:] for _ in range(2))
    await _add(
        sessionmaker,
        [
            *((consumer, event_id, old) for consumer, event_id in old_events.items()),
            ("backend", recent, now - timedelta(days=6)),
            ("workflow", late, now),
            ("notifications", random_low, old),
            ("notifications", random_low_new, now),
        ],
    )

    assert await sweeper.purge_inbox(sessionmaker) == 2  # the most of one consumer

    assert await _kept(sessionmaker) == {
        ("backend", recent),
        ("workflow", late),
        ("notifications", random_low_new),
    }
    # What is kept still refuses its redelivery.
    async with unit_of_work(sessionmaker) as session:
        for consumer, event_id in await _kept(sessionmaker):
            assert not await inbox.first_time(session, consumer, event_id)
    assert await sweeper.purge_inbox(sessionmaker) == 0


async def test_the_sweeper_works_off_a_backlog_a_batch_a_turn(
    sessionmaker: Sessionmaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = utcnow() - WEEK_AND_A_DAY
    backlog = sorted(made_at(old - timedelta(seconds=n)) for n in range(7))
    await _add(sessionmaker, [("backend", event_id, old) for event_id in backlog])
    # A batch of 3: a full batch means more is left, and the next turn comes at once,
    # not after the sweeper's five minutes between purges.
    monkeypatch.setattr(sweeper, "INBOX_BATCH", 3)

    assert await sweeper.purge_inbox(sessionmaker, batch=3) == 3
    assert {event_id for _, event_id in await _kept(sessionmaker)} == set(backlog[3:])

    stop = asyncio.Event()
    sweeping = asyncio.create_task(sweeper.run(sessionmaker, stop, interval=0.05, lost_after=600))
    try:

        async def purged() -> bool:
            return not await _kept(sessionmaker)

        await eventually(purged)
    finally:
        stop.set()
        await sweeping
