"""The generation workflow (seed steps 8–10): claim, run the model, store, announce.

No database transaction is open while the model runs: the claim commits first, the
provider call happens outside, and the result (assets already stored) is announced in a
second transaction together with this consumer's inbox row. A worker that dies in between
leaves a message whose lease runs out; the next worker claims the job again with a higher
attempt number, so the dead worker's late result, if any, is refused as stale.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.backend.job import service as job_service
from aigen.bus import inbox, outbox
from aigen.bus.messages import (
    AIGenerationJobCompleted,
    AIGenerationJobFailed,
    AIGenerationJobRequested,
    AssetRef,
    Envelope,
)
from aigen.config import Settings
from aigen.db.group import GroupCommit
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import Job
from aigen.serving.base import (
    ProgressCallback,
    Provider,
    ProviderError,
    ProviderRequest,
    ProviderResult,
    ProviderTimeout,
    RateLimitedByProvider,
)
from aigen.storage.base import AssetStore, asset_key

CONSUMER = "workflow"
# The longest upstream `Retry-After` waited out, as the OpenAI SDK has it: a worker holding
# a job for longer helps nobody, so a longer ask gets the plain backoff instead.
MAX_RETRY_AFTER_SECONDS = 60.0
# model name → its provider (the serving catalog's `provider`).
ProviderLookup = Callable[[str], Provider]
log = structlog.get_logger(__name__)


class JobCanceled(Exception):
    """The job stopped running (canceled, or claimed by a newer attempt) mid-workflow."""


class Workflow:
    """Runs one `AIGenerationJobRequested` message to its result event."""

    def __init__(
        self,
        sessionmaker: Sessionmaker,
        providers: ProviderLookup,
        store: AssetStore,
        settings: Settings,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._providers = providers
        self._store = store
        self._settings = settings
        # The claims, and the announcements, of the jobs in hand share transactions, and
        # their statements: one multi-row claim, and one record of results, for all.
        self._group = GroupCommit(sessionmaker)

    async def handle(self, envelope: Envelope) -> None:
        message = envelope.message()
        assert isinstance(message, AIGenerationJobRequested)
        job = await self._group.run_batched(_claim_many, (message.job_id, envelope.id), order="1")
        if job is None:
            log.info("workflow.skipped", job_id=message.job_id, reason="not claimable")
            return
        bound = log.bind(job_id=job.id, attempt=job.attempt, model=job.model)
        bound.info("workflow.claimed")
        try:
            result = await self._run(job)
            refs = await self._store_outputs(job, result)
            event: AIGenerationJobCompleted | AIGenerationJobFailed = AIGenerationJobCompleted(
                job_id=job.id,
                account_id=job.account_id,
                attempt=job.attempt,
                assets=refs,
                usage=result.usage.as_dict(),
            )
        except JobCanceled:
            bound.info("workflow.abandoned")
            return
        except ProviderError as error:
            bound.warning("workflow.provider_failed", code=error.code, error=error.message)
            event = AIGenerationJobFailed(
                job_id=job.id,
                account_id=job.account_id,
                attempt=job.attempt,
                error=error.as_error(),
            )
        announced = await self._group.run_batched(
            _announce_many, _Result(envelope, job, event), order="2"
        )
        if announced:
            bound.info("workflow.finished", event_type=type(event).__name__)

    async def _run(self, job: Job) -> ProviderResult:
        """Call the provider with a time limit, retrying retryable errors with backoff."""
        try:
            provider = self._providers(job.model)
        except KeyError:
            # The model left the catalog while the job waited: nothing can run it.
            raise ProviderError(
                f"the model {job.model!r} is no longer offered", code="unknown_model"
            ) from None
        tries = max(1, self._settings.provider_max_tries)
        for number in range(1, tries + 1):
            try:
                return await self._run_once(provider, job)
            except ProviderError as error:
                if not error.retryable or number == tries:
                    raise
                delay = retry_delay(self._settings.provider_retry_base_seconds, number, error)
                log.info("workflow.retry", job_id=job.id, code=error.code, delay=round(delay, 3))
                await asyncio.sleep(delay)
                await self._ensure_running(job)
        raise AssertionError("unreachable")

    async def _run_once(self, provider: Provider, job: Job) -> ProviderResult:
        request = ProviderRequest(
            job_id=job.id,
            model=job.model,
            task=job.task,
            input=job.input,
            on_progress=self._progress_reporter(job),
        )
        call = asyncio.ensure_future(provider.run(request))
        watcher = asyncio.ensure_future(self._watch_cancel(job))
        try:
            async with asyncio.timeout(self._settings.provider_timeout_seconds):
                done, _ = await asyncio.wait({call, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise ProviderTimeout(
                f"the model did not answer within {self._settings.provider_timeout_seconds} s"
            ) from None
        finally:
            watcher.cancel()
            if not call.done():
                # Canceled mid-call (or timed out): interrupt the provider, don't wait for it.
                call.cancel()
        if call not in done:
            raise JobCanceled(job.id)
        return call.result()

    async def _watch_cancel(self, job: Job) -> None:
        """Returns when the job stops running, so the provider call can be interrupted."""
        while True:
            await asyncio.sleep(self._settings.cancel_poll_seconds)
            async with self._sessionmaker() as session:
                if not await job_service.is_running(session, job.id, job.attempt):
                    return

    async def _ensure_running(self, job: Job) -> None:
        async with self._sessionmaker() as session:
            if not await job_service.is_running(session, job.id, job.attempt):
                raise JobCanceled(job.id)

    def _progress_reporter(self, job: Job) -> ProgressCallback:
        # The first report waits one interval too: a job that ends sooner (most of them)
        # writes no progress at all, one transaction fewer on the way to its result.
        last = time.monotonic()

        async def report(progress: dict[str, Any]) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < self._settings.progress_interval_seconds:
                return
            last = now
            async with unit_of_work(self._sessionmaker) as session:
                await job_service.set_progress(session, job.id, job.attempt, progress)

        return report

    async def _store_outputs(self, job: Job, result: ProviderResult) -> list[AssetRef]:
        # No status check first: a cancel during the run already stopped it
        # (`_watch_cancel`), and one that lands now is caught by the check that guards the
        # announcement; its objects, under the job's own keys, are then never shown.
        refs = []
        for index, output in enumerate(result.outputs):
            key = asset_key(job.account_id, job.id, index, output.ext)
            await self._store.put(key, output.data, content_type=output.content_type)
            refs.append(
                AssetRef(
                    key=key,
                    content_type=output.content_type,
                    bytes=len(output.data),
                    sha256=hashlib.sha256(output.data).hexdigest(),
                    index=index,
                )
            )
        return refs


async def _claim_many(session: AsyncSession, claims: Sequence[tuple[str, str]]) -> list[Job | None]:
    # A message announced before (a redelivery) claims nothing: the inbox row says so.
    return await job_service.claim_many(session, claims, consumer=CONSUMER)


@dataclass(frozen=True, slots=True)
class _Result:
    envelope: Envelope  # the message the job came with
    job: Job  # as claimed: its attempt
    event: AIGenerationJobCompleted | AIGenerationJobFailed


async def _announce_many(session: AsyncSession, results: Sequence[_Result]) -> list[bool]:
    """`_announce` of several results in three statements for all of them: the attempts
    still running, the inbox rows of their messages, and the result events."""
    if len(results) == 1:
        [result] = results
        return [await _announce(session, result.envelope, result.job, result.event)]
    running = await job_service.running_attempts(session, [r.job.id for r in results])
    current = [r for r in results if running.get(r.job.id) == r.job.attempt]
    fresh = await inbox.first_time_many(session, CONSUMER, [r.envelope.id for r in current])
    announced: list[bool] = []
    events: list[Envelope] = []
    for result in results:
        if running.get(result.job.id) != result.job.attempt:
            reason = "job no longer running"
            log.info("workflow.result_discarded", job_id=result.job.id, reason=reason)
            announced.append(False)
        elif result.envelope.id in fresh:
            fresh.discard(result.envelope.id)  # (the same message twice: announced once)
            events.append(Envelope.wrap(result.event, traceparent=result.envelope.traceparent))
            announced.append(True)
        else:
            announced.append(False)  # recorded before: a redelivery, nothing to say
    await outbox.add_many(session, events)
    return announced


async def _announce(
    session: AsyncSession,
    envelope: Envelope,
    job: Job,
    event: AIGenerationJobCompleted | AIGenerationJobFailed,
) -> bool:
    """Queue the result event, with this consumer's inbox row; False when it was not.

    The inbox row is written only while the attempt is still running, and the event only
    with it: on PostgreSQL one statement, which commits by itself when the announcement
    is its transaction's only unit (one round trip where BEGIN, two statements and COMMIT
    were four; nothing after it writes).
    """
    running = job_service.running_params(job.id, job.attempt)
    events = [Envelope.wrap(event, traceparent=envelope.traceparent)]
    # Events that go into the embedded queue, in the same database, are added after the
    # record, in its transaction: then it must not commit by itself.
    then = None if outbox.writes_through(session) else outbox.adding(session, events)
    alone = then is not None
    if not await inbox.first_time_if(
        session, CONSUMER, envelope.id, job_service.RUNNING, running, then=then, alone=alone
    ):
        # Recorded before (a redelivery: nothing to say), or the attempt has ended (a
        # cancel, a sweep): which one is read only on this rare path.
        if not await job_service.is_running(session, job.id, job.attempt):
            log.info("workflow.result_discarded", job_id=job.id, reason="job no longer running")
        return False
    if then is None:
        await outbox.add_many(session, events)
    else:
        outbox.added(session, events)
    return True


def retry_delay(base: float, number: int, error: ProviderError) -> float:
    """Seconds to wait before try `number + 1`: exponential backoff with ±20 % jitter, and
    never less than the upstream's `Retry-After` (jitter only ever lengthens that)."""
    delay = base * 2.0 ** (number - 1) * random.uniform(0.8, 1.2)
    retry_after = error.retry_after if isinstance(error, RateLimitedByProvider) else None
    if retry_after is not None and retry_after <= MAX_RETRY_AFTER_SECONDS:
        delay = max(delay, retry_after * random.uniform(1.0, 1.2))
    return delay
