"""Group commit for consumers: units of work that arrive together share one transaction.

A consumer handles many messages at once (its prefetch), and each used to be its own
transaction: a connection checkout, BEGIN, COMMIT and a flush of the database's log for a
few statements of work. `GroupCommit.run` queues a unit of work; while a transaction
runs, the units that arrive wait, and then all go together in the next one, one after
another in the same session. An idle consumer still runs each unit at once and alone;
under load the batches grow by themselves, with no timer (as the API's intake does).
Units that nobody waits for may wait a little for others instead (`linger`: the
notifier's records of its attempts).

A unit of work is a function of the session. It must leave no trace outside the
session before the commit (effects after the commit belong to its caller), because it
may run twice: when any unit of a batch raises, the whole transaction is rolled back
and every unit runs again in a transaction of its own, so that one unit's error (a
deadlock, a constraint) is that unit's alone and the others still commit. When the
database cannot be reached, the units queued behind the failed batch fail with it.

Units of one kind can also share their statements (`run_batched`): a function of the
session and a list of items, which does for all of them at once what a unit does for
one (a multi-row `UPDATE … RETURNING`, say), and returns one result per item. A
transaction then makes a few statements for a whole batch, not a few per unit; alone,
after a failed batch, such an item runs as a list of one.

A transaction of one unit is marked so (`unit_of_work(..., alone=True)`): the statements
it sends first may then commit by themselves, outside the transaction, where the unit
allows it (`driver.execute(..., alone=True)`: the worker's claim, most often the whole
unit). That is one round trip where BEGIN, the statement and COMMIT were three.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.aio import Batcher, fail

from .errors import unreachable
from .session import Sessionmaker, unit_of_work

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 (an item: the usual name beside T)
Work = Callable[[AsyncSession], Awaitable[T]]
# Items → one result per item, in their order: `run_batched`.
BatchWork = Callable[[AsyncSession, Sequence[I]], Awaitable[Sequence[T]]]
_Queued = tuple[str, BatchWork[Any, Any], Any, "asyncio.Future[Any]"]

# Enough to amortise a transaction many times over, few enough that one transaction
# (and the row locks it holds) stays short.
MAX_BATCH = 64

log = structlog.get_logger(__name__)


class GroupCommit(Batcher[_Queued]):
    """Runs units of work in shared transactions, one transaction at a time."""

    def __init__(
        self, sessionmaker: Sessionmaker, *, max_batch: int = MAX_BATCH, linger: float = 0.0
    ) -> None:
        super().__init__(max_batch=max_batch, linger=linger)
        self._sessionmaker = sessionmaker

    async def run(self, work: Work[T], *, order: str = "") -> T:
        """Run `work` in a transaction; returns its result once that has committed.

        The units of one transaction run in the `order` of their keys: units that lock
        shared rows (an account's balance) pass the rows' id, so that every transaction
        takes those locks in the same (ascending) order, and no two of them, here or in
        another process, ever wait for each other in a circle.

        Cancelling the caller does not take the unit out of a transaction already
        running: it may still commit, as it may after a crash of the caller.
        """
        return await self._queue(order, _each, work)

    async def run_batched(self, work: BatchWork[I, T], item: I, *, order: str = "") -> T:
        """Run `work` for `item`, with the other items of the same `work` queued with it:
        the units of a transaction, sorted by `order`, are cut into runs of the same
        `work`, and each run is one call with its items. So give the items of one
        `work` the same `order` (they then all go in one call); `run` then applies."""
        return await self._queue(order, work, item)

    async def _queue(self, order: str, work: BatchWork[Any, T], item: Any) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        # Retrieved even when the caller is gone: no "exception never retrieved".
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._submit((order, work, item, future))
        return await asyncio.shield(future)

    async def _run_batch(self, batch: list[_Queued]) -> None:
        batch.sort(key=lambda queued: queued[0])
        try:
            await self._commit(batch)
        except BaseException:
            for *_, future in [*batch, *self._take_waiting()]:
                future.cancel()
            raise

    async def _commit(self, batch: Sequence[_Queued]) -> None:
        if len(batch) > 1:
            try:
                async with unit_of_work(self._sessionmaker) as session:
                    results = []
                    for work, items in _runs(batch):
                        results += await _call(work, session, items)
            except Exception as error:
                if unreachable(error):
                    self._fail_all(batch, error)
                    return
                log.info("group_commit.split", units=len(batch), error=repr(error))
            else:
                for (*_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
                return
        # One unit, or a batch that failed: each in a transaction of its own.
        for number, (_, work, item, future) in enumerate(batch):
            try:
                async with unit_of_work(self._sessionmaker, alone=True) as session:
                    [result] = await _call(work, session, [item])
            except Exception as error:
                if unreachable(error):
                    self._fail_all(batch[number:], error)
                    return
                fail([future], error)
            else:
                if not future.done():
                    future.set_result(result)

    def _fail_all(self, batch: Sequence[_Queued], error: Exception) -> None:
        """The database is out of reach: those queued behind would wait out the same
        timeouts in turn, so they fail now too, as their own transactions would."""
        fail((future for *_, future in [*batch, *self._take_waiting()]), error)


async def _each(session: AsyncSession, works: Sequence[Work[Any]]) -> list[Any]:
    # `run`'s units: each a function of the session, one after another.
    return [await work(session) for work in works]


def _runs(batch: Sequence[_Queued]) -> list[tuple[BatchWork[Any, Any], list[Any]]]:
    """The batch cut into runs of the same work, in order: one call each."""
    runs: list[tuple[BatchWork[Any, Any], list[Any]]] = []
    for _, work, item, _ in batch:
        if runs and runs[-1][0] == work:  # (==: a bound method is a new object each time)
            runs[-1][1].append(item)
        else:
            runs.append((work, [item]))
    return runs


async def _call(work: BatchWork[Any, Any], session: AsyncSession, items: list[Any]) -> list[Any]:
    results = list(await work(session, items))
    if len(results) != len(items):
        raise RuntimeError(f"{work!r} gave {len(results)} results for {len(items)} items")
    return results
