"""One RabbitMQ channel's settlements, the acks of a turn of the loop sent together.

A consumer's handlers end in bursts: a group commit resumes every handler of its batch in
the same turn of the event loop. Each ack was a frame of its own, and for a quorum queue
a settle command of its own in the server's log. AMQP's `multiple` flag acks every
delivery up to a tag in one frame (RabbitMQ's guide to acknowledgements batches them so,
to save traffic). It may only cover deliveries that are done, so the acks of a batch go
as:

- one `basic.ack multiple` for the unbroken run of the channel's oldest deliveries;
- one `basic.ack` each for the rest (a delivery older than them is still in a handler):
  no ack waits for a slow handler, which would hold its prefetch slot meanwhile.

The settlements are an `aio.Batcher`: those asked for while a batch is written wait for
the next, and the first one of a turn runs with the others of that turn. Nacks and
rejects go through it too, one batch at a time, so a `multiple` ack is never written
while a single settlement of a delivery below its tag is on its way: the server would
refuse the second one and close the channel.
"""

from __future__ import annotations

import asyncio

from aiormq.abc import AbstractChannel

from aigen.aio import Batcher, fail

# A delivery tag; how to settle it (None: ack; else nack or reject, and whether to
# requeue); its caller's future.
_Settlement = tuple[int, tuple[str, bool] | None, "asyncio.Future[None]"]
# At most a prefetch's worth are ever waiting; the bound only keeps a batch finite.
MAX_BATCH = 1024


class Settler(Batcher[_Settlement]):
    """Settles the deliveries of one channel; `received` must see each as it arrives."""

    def __init__(self, channel: AbstractChannel) -> None:
        super().__init__(max_batch=MAX_BATCH)
        self._channel = channel
        # Delivery tags received and not yet settled: a tag leaves once its frame is
        # written (or failed with the channel), never while it waits to be.
        self._open: set[int] = set()

    def received(self, tag: int) -> None:
        self._open.add(tag)

    def holds(self, tag: int) -> bool:
        """Whether `tag` is still unsettled."""
        return tag in self._open

    async def ack(self, tag: int) -> None:
        """Ack `tag` with the others of this turn; returns once the frame is written."""
        await self._settle(tag, None)

    async def nack(self, tag: int, *, requeue: bool) -> None:
        await self._settle(tag, ("nack", requeue))

    async def reject(self, tag: int, *, requeue: bool) -> None:
        await self._settle(tag, ("reject", requeue))

    async def _settle(self, tag: int, how: tuple[str, bool] | None) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submit((tag, how, future))
        # A caller cancelled now leaves its settlement queued: it is written all the same.
        await future

    async def _run_batch(self, batch: list[_Settlement]) -> None:
        acks = {tag for tag, how, _ in batch if how is None}
        try:
            # Everything still open but these acks is busy or settled otherwise here.
            oldest_busy = min(self._open - acks, default=None)
            run = sorted(tag for tag in acks if oldest_busy is None or tag < oldest_busy)
            if run:
                await self._channel.basic_ack(run[-1], multiple=len(run) > 1)
            covered = set(run)
            for tag, how, _ in batch:
                if how is None:
                    if tag not in covered:
                        await self._channel.basic_ack(tag)
                elif how[0] == "nack":
                    await self._channel.basic_nack(tag, requeue=how[1])
                else:
                    await self._channel.basic_reject(tag, requeue=how[1])
        except Exception as error:
            fail((future for _, _, future in batch), error)
            return
        except BaseException:
            for _, _, future in batch:
                future.cancel()
            raise
        finally:
            # Written, or the channel is gone and the server hands them out again.
            self._open -= {tag for tag, _, _ in batch}
        for _, _, future in batch:
            if not future.done():
                future.set_result(None)
