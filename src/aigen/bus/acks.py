"""One RabbitMQ channel's settlements, the acks of a turn of the loop sent together.

A consumer's handlers end in bursts: a group commit resumes every handler of its batch in
the same turn of the event loop. Each ack was a frame of its own, and for a quorum queue
a settle command of its own in the server's log. AMQP's `multiple` flag acks every
delivery up to a tag in one frame (RabbitMQ's guide to acknowledgements batches them so,
to save traffic). It may only cover deliveries that are done, so the acks of one turn go
as:

- one `basic.ack multiple` for the unbroken run of the channel's oldest deliveries;
- one `basic.ack` each for the rest (a delivery older than them is still in a handler):
  no ack waits for a slow handler, which would hold its prefetch slot meanwhile.

Every settlement of the channel (acks, nacks, rejects) goes through one lock, so that a
`multiple` ack is never written while a single settlement of a delivery below its tag
is on its way: the server would refuse the second one and close the channel.
"""

from __future__ import annotations

import asyncio

from aiormq.abc import AbstractChannel


class Settler:
    """Settles the deliveries of one channel; `received` must see each as it arrives."""

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        # Delivery tags received and not yet settled (or settling).
        self._open: set[int] = set()
        # Acks asked for in this turn, and the task that will send them.
        self._ready: set[int] = set()
        self._flush: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()

    def received(self, tag: int) -> None:
        self._open.add(tag)

    def holds(self, tag: int) -> bool:
        """Whether `tag` is still unsettled (and no settlement of it was asked for)."""
        return tag in self._open and tag not in self._ready

    async def ack(self, tag: int) -> None:
        """Ack `tag` with the others of this turn; returns once the frame is written."""
        self._ready.add(tag)
        if self._flush is None:
            self._flush = asyncio.ensure_future(self._send_acks())
            # Its error reaches every handler still waiting; with none left (all cancelled
            # at a shutdown) it is not an error to report again.
            self._flush.add_done_callback(_retrieved)
        # Shielded: a handler cancelled now must not cancel the others' acks.
        await asyncio.shield(self._flush)

    async def nack(self, tag: int, *, requeue: bool) -> None:
        async with self._lock:
            await self._channel.basic_nack(tag, requeue=requeue)
            self._open.discard(tag)

    async def reject(self, tag: int, *, requeue: bool) -> None:
        async with self._lock:
            await self._channel.basic_reject(tag, requeue=requeue)
            self._open.discard(tag)

    async def _send_acks(self) -> None:
        # One turn: the other handlers resumed with this one ask for their acks meanwhile.
        await asyncio.sleep(0)
        async with self._lock:
            # From here on, an ack waits for the next flush.
            self._flush = None
            ready, self._ready = self._ready, set()
            try:
                oldest_busy = min(self._open - ready, default=None)
                run = sorted(t for t in ready if oldest_busy is None or t < oldest_busy)
                if run:
                    await self._channel.basic_ack(run[-1], multiple=len(run) > 1)
                for tag in sorted(ready.difference(run)):
                    await self._channel.basic_ack(tag)
            finally:
                # Sent, or the channel is gone and the server hands them out again.
                self._open -= ready


def _retrieved(flush: asyncio.Future[None]) -> None:
    if not flush.cancelled():
        flush.exception()
