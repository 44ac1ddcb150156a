"""Small asyncio helpers for the long-running loops (relay, consumers, notifier), and the
batching that the API's intake and the consumers' group commit share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake at once when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def wait_any(seconds: float | None, *events: asyncio.Event) -> None:
    """Wait until one of `events` is set, or `seconds` pass (None: no time limit)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def fail(futures: Iterable[asyncio.Future[Any]], error: BaseException) -> None:
    """`error` for each of a batch's `futures` still waiting (a caller that was cancelled
    has its answer already): what every `Batcher` does with a batch that failed."""
    for future in futures:
        if not future.done():
            future.set_exception(error)


# How seldom, at most, an idle polling loop looks (`IdlePoll`).
IDLE_POLL_MAX_SECONDS = 1.0


class IdlePoll:
    """How long a polling loop waits between looks: `shortest` while it finds work, and
    twice as long after each look that found none, up to `longest`.

    A look is a write transaction on SQLite (the embedded queue's claim, the relay's),
    and an idle `aigen up` that looked every 50 ms spent a fifth of a core doing it. The
    loops also wait on a wake-up event, which ends any wait: the poll is only the net for
    work that comes without one (another process's, a lease run out).
    """

    def __init__(self, shortest: float, longest: float = IDLE_POLL_MAX_SECONDS) -> None:
        self._shortest = shortest
        self._longest = max(shortest, longest)
        self._wait = shortest

    def after(self, found: bool) -> float:
        """The wait before the next look, given whether this one found work."""
        if found:
            self._wait = self._shortest
            return self._wait
        wait = self._wait
        self._wait = min(wait * 2, self._longest)
        return wait


class Batcher(Generic[Item]):
    """Items that arrive while a batch runs wait, then go together in the next batch.

    One batch runs at a time, with every item that waited (at most `max_batch`): an idle
    batcher runs an item at once and alone, and under load the batches grow by
    themselves, with no timer. What a batch does is the subclass's `_run_batch`.

    `linger` (seconds) makes a batch of fewer than `max_batch` items wait that long
    first, for others to join it, as Kafka's producer does (`linger.ms`): for work that
    nobody waits for, so that below the maximum it is shared too. Zero (the default) for
    work on a caller's way.
    """

    def __init__(self, *, max_batch: int, linger: float = 0.0) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if linger < 0:
            raise ValueError("linger must not be negative")
        self._max_batch = max_batch
        self._linger = linger
        self._waiting: list[Item] = []
        self._running: asyncio.Task[None] | None = None

    def _submit(self, item: Item) -> None:
        self._waiting.append(item)
        running = self._running
        loop = asyncio.get_running_loop()
        if running is None or running.done() or running.get_loop() is not loop:
            self._running = loop.create_task(self._drain())

    async def _drain(self) -> None:
        # Runs while items wait and ends when none do; the next `_submit` starts it again.
        while self._waiting:
            if self._linger and len(self._waiting) < self._max_batch:
                await asyncio.sleep(self._linger)
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            await self._run_batch(batch)

    def _take_waiting(self) -> list[Item]:
        """Every item queued behind the running batch, out of the queue: for a batch that
        fails in a way that theirs would too (the database out of reach)."""
        waiting, self._waiting = self._waiting, []
        return waiting

    async def _run_batch(self, batch: list[Item]) -> None:
        raise NotImplementedError
