"""Short retries in hand: a handler that asks to be called again shortly is, here, first.

The notifier's consumer receives a result event at the same moment as the backend's, and
asks for a `Retry` (0.2 s) whenever the backend has not applied the result yet. Through
the broker that costs a round trip to a delay queue (RabbitMQ's shortest rung is 0.25 s)
for nearly every job, although the backend is usually done a few milliseconds later.
`retry_soon` calls the handler again after short, growing pauses, and hands the broker a
`Retry` only for what is left of the delay asked for, so a message never waits longer in
all than it would have: the handler is idempotent (inbox rows) and each call is its own
transaction, so an in-hand call is exactly a redelivery that came sooner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from .broker import Handler, Retry
from .messages import Envelope

# Pauses between in-hand calls; they add up to 155 ms.
PAUSES = (0.005, 0.01, 0.02, 0.04, 0.08)


def retry_soon(
    handler: Handler, *, up_to: float = 0.25, pauses: Sequence[float] = PAUSES
) -> Handler:
    """`handler`, retried in hand while it asks for a `Retry` of at most `up_to` seconds."""

    async def handle(envelope: Envelope) -> None:
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
