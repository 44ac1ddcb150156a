"""A job as this API shows it: `views.render` with this request's base URL and store."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession

from aigen.backend.job import views
from aigen.backend.job.schemas import JobOut
from aigen.models import Job

from .state import get_state


async def render_job(
    request: Request,
    session: AsyncSession | None,
    job: Job,
    *,
    with_queue_position: bool = True,
    with_assets: bool = True,
) -> JobOut:
    deps = get_state(request).deps
    return await views.render(
        session,
        job,
        store=deps.store,
        base_url=str(request.base_url),
        url_ttl=deps.settings.asset_url_ttl_seconds,
        with_queue_position=with_queue_position,
        with_assets=with_assets,
    )
