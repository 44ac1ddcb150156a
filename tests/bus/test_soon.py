"""`retry_soon`: short retries are taken in hand first; long ones and the rest pass through."""

from __future__ import annotations

import pytest

from aigen.bus.broker import Handler, Retry
from aigen.bus.messages import AIGenerationJobCanceled, Envelope
from aigen.bus.soon import retry_soon

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
