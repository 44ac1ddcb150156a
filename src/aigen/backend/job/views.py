"""Rendering a job for the API and for webhooks; one function, so both always agree."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from aigen.models import Asset, Job
from aigen.storage.base import AssetStore

from . import service
from .schemas import AssetOut, JobError, JobOut, JobStatus, JobUrls

# session.info: job id → its assets, read ahead for the renders of one transaction.
_PRELOADED = "aigen.views.assets"


@contextmanager
def preloaded_assets(session: AsyncSession, assets: dict[str, list[Asset]]) -> Iterator[None]:
    """Within the block, `render` takes a job's assets from `assets` (read by the caller
    for many jobs in one statement, `service.assets_of_many`) instead of a query each."""
    session.info[_PRELOADED] = assets
    try:
        yield
    finally:
        session.info.pop(_PRELOADED, None)


async def _assets(session: AsyncSession, job_id: str) -> Sequence[Asset]:
    preloaded: dict[str, list[Asset]] | None = session.info.get(_PRELOADED)
    if preloaded is not None and job_id in preloaded:
        return preloaded[job_id]
    return await service.assets_of(session, job_id)


def job_urls(base_url: str, job_id: str) -> JobUrls:
    root = f"{base_url.rstrip('/')}/v1/generate/{job_id}"
    return JobUrls(self=root, status=f"{root}/status", cancel=f"{root}/cancel")


async def render(
    session: AsyncSession | None,
    job: Job,
    *,
    store: AssetStore,
    base_url: str,
    url_ttl: int,
    with_queue_position: bool = True,
    with_assets: bool = True,
) -> JobOut:
    """The job as the API and webhooks show it; `with_assets=False` skips the assets
    query for a job that cannot have any yet (one just accepted). Without either query
    no session is needed (a job rendered before the transaction that stores it)."""
    assets = []
    if with_assets or with_queue_position:
        assert session is not None, "reading assets or the queue position needs a session"
    for asset in await _assets(session, job.id) if session is not None and with_assets else []:
        url, expires_at = await store.url(asset.key, expires_in=url_ttl)
        assets.append(
            AssetOut(
                url=url,
                content_type=asset.content_type,
                bytes=asset.bytes,
                sha256=asset.sha256,
                url_expires_at=expires_at,
            )
        )
    position = (
        await service.queue_position(session, job)
        if session is not None and with_queue_position
        else None
    )
    return JobOut(
        id=job.id,
        model=job.model,
        status=job.status,
        input=job.input,
        metadata=job.meta,
        webhook_url=job.webhook_url,
        webhook_events=job.webhook_events,
        attempt=job.attempt,
        progress=job.progress,
        queue_position=position,
        assets=assets,
        error=JobError(**job.error) if job.error else None,
        credits_reserved=job.credits_reserved,
        credits_charged=job.credits_charged,
        usage=job.usage,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.processing_at,
        completed_at=job.completed_at,
        failed_at=job.failed_at,
        canceled_at=job.canceled_at,
        expired_at=job.expired_at,
        deadline_at=job.deadline_at,
        urls=job_urls(base_url, job.id),
    )


async def render_status(session: AsyncSession, job: Job) -> JobStatus:
    return JobStatus(
        id=job.id,
        status=job.status,
        progress=job.progress,
        queue_position=await service.queue_position(session, job),
        updated_at=job.updated_at,
    )
