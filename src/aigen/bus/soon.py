"""Short retries in hand: a handler that asks to be called again shortly is, here, first.

The notifier's consumer receives a result event at the same moment as the backend's, and
asks for a `Retry` (0.2 s) whenever the backend has not applied the result yet. Through
the broker that costs a round trip to a delay queue (RabbitMQ's shortest rung is 0.25 s)
for nearly every job, although the backend is usually done a few milliseconds later.
`retry_soon` calls the handler again after short, growing pauses, and hands the broker a
`Retry` only for what is left of the delay asked for, so a message never waits longer in
all than it would have: the handler is idempotent (inbox rows) and each call is its own
transaction, so an in-hand call is exactly a redelivery that came sooner.

`first_at_age` holds the first call until the event is that old (by its `time`): the
backend needs some milliseconds from a result's announcement to its commit, and a look
before that only costs the notifier a transaction that finds nothing. An event that
is older already (a backlog) is handled at once; a wrong clock makes it wait at most
`first_at_age`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aigen.clock import utcnow

from .broker import Handler, Retry
from .messages import Envelope

# Pauses between in-hand calls; they add up to 155 ms.
PAUSES = (0.005, 0.01, 0.02, 0.04, 0.08)


def retry_soon(
    handler: Handler,
    *,
    up_to: float = 0.25,
    pauses: Sequence[float] = PAUSES,
    first_at_age: float = 0.0,
) -> Handler:
    """`handler`, retried in hand while it asks for a `Retry` of at most `up_to` seconds."""

    async def handle(envelope: Envelope) -> None:
        if first_at_age > 0:
            age = (utcnow() - envelope.time).total_seconds()
            early = min(first_at_age, first_at_age - age)
            if early > 0:
                await asyncio.sleep(early)
        waited = 0.0
        for pause in pauses:
            try:
                await handler(envelope)
                return
            except Retry as retry:
                if retry.delay > up_to or waited + pause > retry.delay:
                    raise
                await asyncio.sleep(pause)
                waited += pause
        try:
            await handler(envelope)
        except Retry as retry:
            if retry.delay > up_to:
                raise
            raise Retry(max(0.0, retry.delay - waited), str(retry)) from retry

    return handle
