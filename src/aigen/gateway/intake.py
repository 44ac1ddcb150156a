"""Group commit for `POST /v1/generate`: the jobs that arrive together share one transaction.

Every accepted job locks its account's row (the balance, and with it the count of the
key's jobs in flight) until its transaction commits. One transaction per job makes that
lock, the round trips and the commit the ceiling of the whole API: about a hundred jobs
a second for one account, however many processes serve it. Here the jobs that arrive
while a transaction runs wait for it to end and then go together in the next one
(`job_service.create_many`), as a database groups the commits of concurrent
transactions into one flush of its log. An idle API still runs each job at once, alone;
under load the batches grow by themselves, with no timer.

Each job is still judged on its own (402, 429, 409), and a job is answered `202` only
once the transaction holding it has committed. A database error fails the whole batch,
and each request then undoes its own quota reservation, as for a transaction of its own;
when the database cannot be reached, the jobs waiting for the next batch fail with it,
so that no request waits out more than one batch's timeouts.
"""

from __future__ import annotations

import asyncio

from aigen.aio import Batcher, fail
from aigen.backend.job import service as job_service
from aigen.bootstrap import Deps
from aigen.db.errors import unreachable
from aigen.db.session import unit_of_work
from aigen.errors import AppError

Outcome = job_service.Accepted | AppError

# Enough to amortise a transaction many times over; few enough that one batch's
# transaction (a multi-row INSERT per table) stays short.
MAX_BATCH = 200


class Intake(Batcher[tuple[job_service.Candidate, "asyncio.Future[Outcome]"]]):
    """Accepts jobs in batches, one transaction at a time per process."""

    def __init__(self, deps: Deps, *, max_batch: int = MAX_BATCH) -> None:
        super().__init__(max_batch=max_batch)
        self._deps = deps

    async def create(self, candidate: job_service.Candidate) -> job_service.Accepted:
        """Accept one job; returns once it is committed, or raises its refusal."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._submit((candidate, future))
        try:
            outcome = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The batch goes on without this request; the caller's undo must see whether
            # the job was committed, so it waits for the outcome before it unwinds.
            await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # retrieved: the undo below decides from the database
            raise
        if isinstance(outcome, AppError):
            raise outcome
        return outcome

    async def _run_batch(
        self, batch: list[tuple[job_service.Candidate, asyncio.Future[Outcome]]]
    ) -> None:
        try:
            # One unit of work: its statements may commit by themselves where it allows
            # (`job_service.create_many`: one account's jobs, without its lock).
            async with unit_of_work(self._deps.sessionmaker, alone=True) as session:
                outcomes = await job_service.create_many(session, [c for c, _ in batch])
        except Exception as error:
            if unreachable(error):
                # The jobs queued behind this batch would wait out the same timeouts one
                # batch after another; they get the same 503 now, as their own
                # transactions would have given them.
                batch = [*batch, *self._take_waiting()]
            fail((future for _, future in batch), error)
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)
