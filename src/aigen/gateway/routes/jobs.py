"""`/v1/generate`: accept, read, poll, list and cancel jobs (seed steps 1–6, DESIGN §3)."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response

from aigen.backend.job import service as job_service
from aigen.backend.job import views
from aigen.backend.job.schemas import JobCreate, JobList, JobOut, JobStatus
from aigen.errors import (
    AppError,
    Conflict,
    Forbidden,
    NotFound,
    PaymentRequired,
    RateLimited,
    Unauthorized,
    Unprocessable,
)
from aigen.gateway.auth import JobsRead, JobsWrite
from aigen.gateway.deps import DepsDep, SessionDep
from aigen.gateway.json_body import require_json
from aigen.models.job import TERMINAL
from aigen.serving.catalog import UnknownModelError
from aigen.serving.inputs import InvalidInputError, validate_input

router = APIRouter(prefix="/v1/generate", tags=["jobs"])

COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: Unauthorized.schema(),
    403: Forbidden.schema(),
    429: RateLimited.schema(),
}
JobID = Annotated[str, "a job id, `job_…`"]


class UnknownModelProblem(Unprocessable):
    code = "unknown_model"
    title = "Unknown model"


class InvalidInputProblem(Unprocessable):
    code = "invalid_input"
    title = "The input does not fit the model's task"


def _retry_after(status: str) -> str:
    # Polling hint: soon while queued or running; nothing once terminal.
    return "1" if status == "processing" else "2"


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses={
        **COMMON_ERRORS,
        400: AppError.schema(),
        402: PaymentRequired.schema(),
        413: AppError.schema(),
        415: AppError.schema(),
        422: Unprocessable.schema(),
    },
    dependencies=[require_json],
)
async def create(
    body: JobCreate,
    principal: JobsWrite,
    session: SessionDep,
    deps: DepsDep,
    request: Request,
    response: Response,
    traceparent: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> JobOut:
    """Accept a generation job: checks the key and its limits, holds the worst-case price,
    records the job and answers `202` with it (`status: "pending"`). The result arrives by
    webhook (`webhook_url`) or by polling `urls.status`."""
    try:
        spec = deps.catalog.get(body.model)
    except UnknownModelError:
        raise UnknownModelProblem(
            f"no model named {body.model!r}; GET /v1/models lists them"
        ) from None
    try:
        clean_input = validate_input(spec.task, body.input)
    except InvalidInputError as error:
        raise InvalidInputProblem(str(error), extra={"errors": error.errors}) from None
    if body.metadata is not None and len(body.metadata) > 16:
        raise Unprocessable("metadata may have at most 16 keys")
    job = await job_service.create(
        session,
        principal,
        job_service.NewJob(
            model=spec.name,
            task=spec.task,
            input=clean_input,
            hold=spec.worst_case(clean_input),
            webhook_url=str(body.webhook_url) if body.webhook_url else None,
            webhook_events=list(body.webhook_events) if body.webhook_events else None,
            metadata=body.metadata,
            deadline_s=body.deadline_s,
        ),
        traceparent=traceparent,
    )
    out = await views.render(
        session,
        job,
        store=deps.store,
        base_url=str(request.base_url),
        url_ttl=deps.settings.asset_url_ttl_seconds,
        with_queue_position=False,
    )
    response.headers["Location"] = out.urls.self
    response.headers["Retry-After"] = "1"
    return out


@router.get("", response_model=JobList, responses=COMMON_ERRORS)
async def list_jobs(
    principal: JobsRead,
    session: SessionDep,
    deps: DepsDep,
    request: Request,
    status: Annotated[str | None, Query(description="only jobs in this status")] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    """The caller's jobs, newest first, a page at a time."""
    jobs = await job_service.list_for(
        session, principal.account_id, status=status, before=cursor, limit=limit + 1
    )
    page = jobs[:limit]
    data = [
        await views.render(
            session,
            job,
            store=deps.store,
            base_url=str(request.base_url),
            url_ttl=deps.settings.asset_url_ttl_seconds,
            with_queue_position=False,
        )
        for job in page
    ]
    more = len(jobs) > limit
    return JobList(data=data, has_more=more, next_cursor=page[-1].id if more else None)


@router.get(
    "/{job_id}/status",
    response_model=JobStatus,
    responses={**COMMON_ERRORS, 404: NotFound.schema()},
)
async def status(
    job_id: JobID,
    principal: JobsRead,
    session: SessionDep,
    request: Request,
) -> Response:
    """Cheap polling: status, progress and queue position, with an `ETag`."""
    job = await job_service.get(session, job_id, account_id=principal.account_id)
    out = await views.render_status(session, job)
    payload = out.model_dump_json()
    etag = '"' + hashlib.sha256(payload.encode()).hexdigest()[:20] + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if job.status not in TERMINAL:
        headers["Retry-After"] = _retry_after(job.status)
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(payload, media_type="application/json", headers=headers)


@router.get("/{job_id}", response_model=JobOut, responses={**COMMON_ERRORS, 404: NotFound.schema()})
async def get(
    job_id: JobID,
    principal: JobsRead,
    session: SessionDep,
    deps: DepsDep,
    request: Request,
    response: Response,
) -> JobOut:
    """The whole job: input, status, timestamps, assets (fresh URLs), error, credits, usage."""
    job = await job_service.get(session, job_id, account_id=principal.account_id)
    if job.status not in TERMINAL:
        response.headers["Retry-After"] = _retry_after(job.status)
    return await views.render(
        session,
        job,
        store=deps.store,
        base_url=str(request.base_url),
        url_ttl=deps.settings.asset_url_ttl_seconds,
    )


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses={**COMMON_ERRORS, 404: NotFound.schema(), 409: Conflict.schema()},
)
async def cancel(
    job_id: JobID,
    principal: JobsWrite,
    session: SessionDep,
    deps: DepsDep,
    request: Request,
) -> JobOut:
    """Cancel a pending job (refunded in full) or stop a processing one (also refunded)."""
    job = await job_service.cancel(session, job_id, account_id=principal.account_id)
    return await views.render(
        session,
        job,
        store=deps.store,
        base_url=str(request.base_url),
        url_ttl=deps.settings.asset_url_ttl_seconds,
    )
