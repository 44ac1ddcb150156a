"""`/v1/generate`: accept, read, poll, list and cancel jobs (seed steps 1–6, DESIGN §3)."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response

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
from aigen.gateway import acceptance, idempotency, waiting
from aigen.gateway.auth import JobsCreate, JobsRead, JobsWrite
from aigen.gateway.deps import DepsDep, SessionDep
from aigen.gateway.json_body import require_json
from aigen.gateway.rendering import render_job
from aigen.models.job import TERMINAL

router = APIRouter(prefix="/v1/generate", tags=["jobs"])

COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: Unauthorized.schema(),
    403: Forbidden.schema(),
    429: RateLimited.schema(),
}
JobID = Annotated[str, "a job id, `job_…`"]

# `POST /v1/generate`'s optional headers are read from the request in the route: as
# FastAPI `Header` parameters, three lookups cost about 8 % of the accept path's CPU
# (BENCHMARKS.md). They are declared here so that the OpenAPI document still shows them.
_CREATE_HEADERS: list[dict[str, Any]] = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        "description": "Makes a retry safe: the same key and body within 24 h replays the "
        "first answer (`Idempotent-Replayed: true`) instead of creating a second job; "
        "another body is `422`, a first request still in progress `409`.",
    },
    {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "examples": ["wait=10"]},
        "description": "`wait=N` (N ≤ 60): answer `200` with the finished job if it ends "
        "within N seconds, else the usual `202`.",
    },
]


def _retry_after(status: str) -> str:
    # Polling hint: soon while queued or running; nothing once terminal.
    return "1" if status == "processing" else "2"


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses={
        **COMMON_ERRORS,
        200: {"model": JobOut, "description": "With `Prefer: wait=N`: the job ended in time."},
        400: AppError.schema(),
        402: PaymentRequired.schema(),
        409: Conflict.schema(),
        413: AppError.schema(),
        415: AppError.schema(),
        422: Unprocessable.schema(),
    },
    dependencies=[require_json],
    openapi_extra={"parameters": _CREATE_HEADERS},
)
async def create(
    body: JobCreate,
    principal: JobsCreate,
    request: Request,
) -> Response:
    """Accept a generation job: checks the key and its limits, holds the worst-case price,
    records the job and answers `202` with it (`status: "pending"`). The result arrives by
    webhook (`webhook_url`) or by polling `urls.status`."""
    submission = acceptance.Submission(
        body=body,
        raw=await request.body(),
        idempotency_key=idempotency.parse_key(request.headers.get("idempotency-key")),
        wait=waiting.parse_prefer(request.headers.get("prefer")),
        traceparent=request.headers.get("traceparent"),
    )
    return await acceptance.accept(request, principal, submission)


@router.get("", response_model=JobList, responses=COMMON_ERRORS)
async def list_jobs(
    principal: JobsRead,
    session: SessionDep,
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
    data = [await render_job(request, session, job, with_queue_position=False) for job in page]
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
    request: Request,
    response: Response,
) -> JobOut:
    """The whole job: input, status, timestamps, assets (fresh URLs), error, credits, usage."""
    job = await job_service.get(session, job_id, account_id=principal.account_id)
    if job.status not in TERMINAL:
        response.headers["Retry-After"] = _retry_after(job.status)
    return await render_job(request, session, job)


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
    background: BackgroundTasks,
) -> JobOut:
    """Cancel a pending job (refunded in full) or stop a processing one (also refunded)."""
    job = await job_service.cancel(session, job_id, account_id=principal.account_id)
    # After the commit (the session closes before the answer is sent), the key's credit
    # quotas get the hold back too; the backend would, later, and only one of them counts.
    background.add_task(deps.limiter.refund, job.api_key_id, job.id, credits=job.credits_reserved)
    return await render_job(request, session, job)
