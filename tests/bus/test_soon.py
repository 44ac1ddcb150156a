"""`retry_soon`: short retries are taken in hand first; long ones and the rest pass through."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from aigen.bus.broker import Handler, Retry
from aigen.bus.messages import AIGenerationJobCanceled, Envelope
from aigen.bus.soon import retry_soon
from aigen.clock import utcnow

EVENT = Envelope.wrap(AIGenerationJobCanceled(job_id="job-1", account_id="acc-1"))
FAST = (0.001, 0.001, 0.001)


def _retrying(times: int, *, delay: float) -> tuple[Handler, list[Envelope]]:
    calls: list[Envelope] = []

    async def handler(envelope: Envelope) -> None:
        calls.append(envelope)
        if len(calls) <= times:
            raise Retry(delay, "not yet")

    return handler, calls


async def test_a_short_retry_is_taken_in_hand() -> None:
    handler, calls = _retrying(2, delay=0.2)
    await retry_soon(handler, pauses=FAST)(EVENT)
    assert calls == [EVENT, EVENT, EVENT]


async def test_what_is_left_of_the_delay_goes_to_the_broker() -> None:
    handler, calls = _retrying(10, delay=0.2)
    with pytest.raises(Retry) as raised:
        await retry_soon(handler, pauses=FAST)(EVENT)
    assert len(calls) == len(FAST) + 1
    assert raised.value.delay == pytest.approx(0.2 - sum(FAST))


async def test_a_long_retry_passes_through_at_once() -> None:
    handler, calls = _retrying(1, delay=5.0)
    with pytest.raises(Retry) as raised:
        await retry_soon(handler, pauses=FAST)(EVENT)
    assert calls == [EVENT]
    assert raised.value.delay == 5.0


async def test_other_errors_pass_through_at_once() -> None:
    calls: list[Envelope] = []

    async def handler(envelope: Envelope) -> None:
        calls.append(envelope)
        raise KeyError("job_id")

    with pytest.raises(KeyError):
        await retry_soon(handler, pauses=FAST)(EVENT)
    assert calls == [EVENT]


async def test_a_fresh_event_is_first_handled_once_it_is_old_enough() -> None:
    calls: list[float] = []

    async def handler(envelope: Envelope) -> None:
        calls.append((utcnow() - envelope.time).total_seconds())

    fresh = Envelope.wrap(AIGenerationJobCanceled(job_id="job-2", account_id="acc-1"))
    await retry_soon(handler, pauses=FAST, first_at_age=0.05)(fresh)
    assert len(calls) == 1
    assert calls[0] >= 0.05


async def test_an_old_event_is_handled_at_once() -> None:
    started = time.monotonic()
    old = Envelope(type=EVENT.type, data=EVENT.data, time=utcnow() - timedelta(seconds=1))
    handler, calls = _retrying(0, delay=0.2)
    await retry_soon(handler, pauses=FAST, first_at_age=0.9)(old)
    assert calls == [old]
    assert time.monotonic() - started < 0.6  # not held for another 0.9 s


async def test_a_publisher_clock_ahead_makes_it_wait_no_longer_than_asked() -> None:
    started = time.monotonic()
    ahead = Envelope(type=EVENT.type, data=EVENT.data, time=utcnow() + timedelta(hours=1))
    handler, calls = _retrying(0, delay=0.2)
    await retry_soon(handler, pauses=FAST, first_at_age=0.05)(ahead)
    assert calls == [ahead]
    assert time.monotonic() - started < 5  # not held for the hour its clock says


class NoticeForTests:
    """A `watch` double: its notice comes when the test says, and it may be deaf."""

    def __init__(self, *, hearing: bool = True) -> None:
        self.hearing = hearing
        self.notice = asyncio.Event()

    async def wait(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.notice.wait(), seconds)
        heard = self.notice.is_set()
        self.notice.clear()
        return heard

    @contextlib.contextmanager
    def watch(self, _: Envelope) -> Iterator[NoticeForTests]:
        yield self


async def test_a_notice_ends_the_pause_early() -> None:
    notice = NoticeForTests()
    handler, calls = _retrying(1, delay=10.0)
    asyncio.get_running_loop().call_later(0.05, notice.notice.set)
    started = time.monotonic()
    await retry_soon(handler, up_to=10.0, pauses=(5.0,), watch=notice.watch)(EVENT)
    assert calls == [EVENT, EVENT]
    assert time.monotonic() - started < 2.5  # not the 5 s pause


async def test_a_pause_cut_short_by_a_notice_counts_as_long_as_it_was() -> None:
    # Notices end three pauses early; the fourth call is still within the delay.
    notice = NoticeForTests()
    calls: list[Envelope] = []

    async def handler(envelope: Envelope) -> None:
        calls.append(envelope)
        if len(calls) <= 3:
            asyncio.get_running_loop().call_later(0.01, notice.notice.set)
            raise Retry(1.0, "not yet")

    await retry_soon(handler, up_to=1.0, pauses=(0.5, 0.5, 0.5), watch=notice.watch)(EVENT)
    assert len(calls) == 4


async def test_while_hearing_the_first_call_waits_for_its_notice() -> None:
    notice = NoticeForTests()
    handler, calls = _retrying(0, delay=0.2)
    fresh = Envelope.wrap(AIGenerationJobCanceled(job_id="job-3", account_id="acc-1"))
    asyncio.get_running_loop().call_later(0.1, notice.notice.set)
    started = time.monotonic()
    await retry_soon(
        handler, pauses=FAST, first_at_age=0.0, watch=notice.watch, first_at_age_hearing=5.0
    )(fresh)
    assert calls == [fresh]
    assert 0.09 <= time.monotonic() - started < 2.5  # held for the notice, not for 5 s


async def test_a_deaf_watch_keeps_the_first_call_as_without_notices() -> None:
    notice = NoticeForTests(hearing=False)
    handler, calls = _retrying(0, delay=0.2)
    fresh = Envelope.wrap(AIGenerationJobCanceled(job_id="job-4", account_id="acc-1"))
    started = time.monotonic()
    await retry_soon(
        handler, pauses=FAST, first_at_age=0.0, watch=notice.watch, first_at_age_hearing=5.0
    )(fresh)
    assert calls == [fresh]
    assert time.monotonic() - started < 2.5
