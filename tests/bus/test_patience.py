"""`patient`: an unreachable database becomes a `Retry` (no delivery counted); the rest fails."""

from __future__ import annotations

import pytest

from aigen.bus.broker import Handler, Retry
from aigen.bus.messages import AIGenerationJobCanceled, Envelope
from aigen.bus.patience import patient

EVENT = Envelope.wrap(AIGenerationJobCanceled(job_id="job-1", account_id="acc-1"))


def _raising(error: Exception) -> Handler:
    async def handler(envelope: Envelope) -> None:
        raise error

    return handler


async def test_unreachable_database_is_a_retry() -> None:
    handler = patient(_raising(ConnectionRefusedError(111, "refused")), delay=2.5)
    with pytest.raises(Retry) as raised:
        await handler(EVENT)
    assert raised.value.delay == 2.5


async def test_other_errors_still_count() -> None:
    handler = patient(_raising(KeyError("job_id")), delay=2.5)
    with pytest.raises(KeyError):
        await handler(EVENT)


async def test_success_passes_through() -> None:
    seen: list[Envelope] = []

    async def handler(envelope: Envelope) -> None:
        seen.append(envelope)

    await patient(handler, delay=1.0)(EVENT)
    assert seen == [EVENT]
