"""Short retries in hand: a handler that asks to be called again shortly is, here, first.

The notifier's consumer receives a result event at the same moment as the backend's, and
asks for a short `Retry` whenever the backend has not applied the result yet. Through
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

With `watch`, every pause (and the wait for `first_at_age`) ends as soon as a notice says
the handler may now succeed (`aigen.db.notices`: the backend committed the job's end), so
a result is taken up a moment after the backend has applied it, not at the end of a
pause; the pauses remain for a notice that is lost. While notices are heard, the first
call can wait longer for its notice (`first_at_age_hearing`), since the notice ends the
wait as soon as the backend is done: fewer calls find nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from aigen.clock import utcnow

from .broker import Handler, Retry
from .messages import Envelope

# Pauses between in-hand calls; they add up to 155 ms.
PAUSES = (0.005, 0.01, 0.02, 0.04, 0.08)


class Waiter(Protocol):
    @property
    def hearing(self) -> bool:
        """Whether notices reach this waiter now (a listener is connected)."""
        ...

    async def wait(self, seconds: float) -> bool:
        """Wait at most `seconds` for a notice; whether one came (since the last wait)."""
        ...


# An envelope → a waiter for the notice that the handler may now succeed, while in use.
Watch = Callable[[Envelope], AbstractContextManager[Waiter]]


class _Sleep:
    """The waiter without notices: each wait is the whole pause."""

    hearing = False

    async def wait(self, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return False


@contextlib.contextmanager
def _no_watch(_: Envelope) -> Iterator[Waiter]:
    yield _Sleep()


def retry_soon(
    handler: Handler,
    *,
    up_to: float = 0.25,
    pauses: Sequence[float] = PAUSES,
    first_at_age: float = 0.0,
    watch: Watch | None = None,
    first_at_age_hearing: float | None = None,
) -> Handler:
    """`handler`, retried in hand while it asks for a `Retry` of at most `up_to` seconds.

    While the `watch` hears notices, the first call waits for the envelope's notice, or
    until the event is `first_at_age_hearing` old (`first_at_age` by default).
    """
    watching = watch or _no_watch

    async def handle(envelope: Envelope) -> None:
        # Watching from the start: a notice that comes during a call is not missed.
        with watching(envelope) as waiter:
            first = first_at_age
            if waiter.hearing and first_at_age_hearing is not None:
                first = first_at_age_hearing
            if first > 0:
                age = (utcnow() - envelope.time).total_seconds()
                early = min(first, first - age)
                if early > 0:
                    await waiter.wait(early)
            waited = 0.0
            for pause in pauses:
                try:
                    await handler(envelope)
                    return
                except Retry as retry:
                    if retry.delay > up_to or waited + pause > retry.delay:
                        raise
                    started = asyncio.get_running_loop().time()
                    await waiter.wait(pause)
                    # A wait cut short by a notice counts as long as it was.
                    waited += min(pause, asyncio.get_running_loop().time() - started)
            try:
                await handler(envelope)
            except Retry as retry:
                if retry.delay > up_to:
                    raise
                raise Retry(max(0.0, retry.delay - waited), str(retry)) from retry

    return handle
