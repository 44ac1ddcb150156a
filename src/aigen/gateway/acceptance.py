"""`POST /v1/generate`, step by step (seed steps 2–6; DESIGN §3 and §6).

1. The model and input are checked and the worst-case price (the hold) is computed.
2. One limiter call counts the request and takes one job and the hold from the key's
   quotas, all or nothing, under a reservation named by the new job's id.
3. With an `Idempotency-Key`, the key is claimed in a short transaction of its own; a
   key already answered replays that answer.
4. The job transaction: concurrency count, credit hold (402 when short), job and outbox
   rows, and the response stored for the idempotency key, all or nothing. The jobs that
   arrive together share one transaction (`intake`), each still judged on its own.
5. After the commit, with `Prefer: wait=N`, the request waits for the job to end while
   holding no transaction.

When step 3 or 4 fails, the quotas taken in step 2 are given back and the claim is
abandoned, so a retry starts afresh; a quota is never left counting a job that was not
accepted, and never counts less than the jobs that were.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from fastapi import Request
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response

from aigen.backend.idempotency.service import Claim, StoredResponse
from aigen.backend.job import service as job_service
from aigen.backend.job.schemas import JobCreate
from aigen.backend.principal import Principal
from aigen.bootstrap import Deps
from aigen.config import Settings
from aigen.errors import AppError, Unprocessable
from aigen.ids import new_id
from aigen.models import Job
from aigen.notifications.endpoint_service import UnsafeWebhookURLError
from aigen.notifications.ssrf import UnsafeURLError, check_without_resolving
from aigen.serving.catalog import Catalog, UnknownModelError
from aigen.serving.inputs import InvalidInputError, validate_input

from . import admission, idempotency, waiting
from .rendering import render_job
from .state import get_state

log = structlog.get_logger(__name__)
JSON = "application/json"


class UnknownModelProblem(Unprocessable):
    code = "unknown_model"
    title = "Unknown model"


class InvalidInputProblem(Unprocessable):
    code = "invalid_input"
    title = "The input does not fit the model's task"


@dataclass(frozen=True, slots=True)
class Submission:
    body: JobCreate
    raw: bytes
    idempotency_key: str | None = None
    wait: int | None = None
    traceparent: str | None = None


def prepare(
    body: JobCreate, catalog: Catalog, job_id: str, settings: Settings
) -> job_service.NewJob:
    """The job to create, priced at its worst case; 422 when the model, the input or the
    webhook URL is wrong (a URL's host name is checked again at each attempt)."""
    webhook_url = str(body.webhook_url) if body.webhook_url else None
    if webhook_url is not None:
        try:
            check_without_resolving(webhook_url, settings, https_only=settings.webhook_https_only)
        except UnsafeURLError as error:
            raise UnsafeWebhookURLError(str(error)) from None
    try:
        spec = catalog.get(body.model)
    except UnknownModelError:
        raise UnknownModelProblem(
            f"no model named {body.model!r}; GET /v1/models lists them"
        ) from None
    try:
        clean_input = validate_input(spec.task, body.input)
        hold = spec.worst_case(clean_input)
    except InvalidInputError as error:
        raise InvalidInputProblem(str(error), extra={"errors": error.errors}) from None
    if body.metadata is not None and len(body.metadata) > 16:
        raise Unprocessable("metadata may have at most 16 keys")
    return job_service.NewJob(
        id=job_id,
        model=spec.name,
        task=spec.task,
        input=clean_input,
        hold=hold,
        webhook_url=webhook_url,
        webhook_events=list(body.webhook_events) if body.webhook_events else None,
        metadata=body.metadata,
        deadline_s=body.deadline_s,
    )


async def accept(request: Request, principal: Principal, submission: Submission) -> Response:
    """Run steps 1–5 and answer: `202` with the job, `200` when it ended while waiting."""
    deps = get_state(request).deps
    job_id = new_id("job")
    try:
        new = prepare(submission.body, deps.catalog, job_id, deps.settings)
    except AppError:
        await admission.admit(request, principal)  # a refused request still counts
        raise
    key = submission.idempotency_key
    digest = idempotency.fingerprint(submission.raw) if key else ""
    try:
        await admission.admit(request, principal, jobs=1, credits=new.hold, reservation=job_id)
    except admission.QuotaExceededError:
        # A retry of a job that filled the quota gets its answer, not a 429.
        found = await _stored(deps, principal, key, digest)
        if found is not None:
            return idempotency.replay(found)
        raise

    owned: Claim | None = None
    try:
        if key is not None:
            claimed = await idempotency.claim(
                deps, api_key_id=principal.key_id, key=key, digest=digest
            )
            if isinstance(claimed, StoredResponse):
                await deps.limiter.give_back(principal.key_id, job_id)
                return idempotency.replay(claimed)
            owned = claimed
        payload, headers = await _create(request, principal, new, owned, submission)
    except BaseException as error:
        await _undo(deps, principal, job_id, owned, rolled_back=isinstance(error, AppError))
        raise

    if submission.wait is None:
        return Response(payload, status_code=202, media_type=JSON, headers=headers)
    return await _wait(request, deps, job_id, owned, payload, headers, submission.wait)


async def _stored(
    deps: Deps, principal: Principal, key: str | None, digest: str
) -> StoredResponse | None:
    if key is None:
        return None
    return await idempotency.stored(deps, api_key_id=principal.key_id, key=key, digest=digest)


async def _create(
    request: Request,
    principal: Principal,
    new: job_service.NewJob,
    owned: Claim | None,
    submission: Submission,
) -> tuple[str, dict[str, str]]:
    # The answer is rendered before the transaction (a new job has no assets and no
    # queue position to read), so that it can be stored for the idempotency key in it.
    job = job_service.new_row(principal, new)
    out = await render_job(request, None, job, with_queue_position=False, with_assets=False)
    payload = out.model_dump_json()
    headers = {"Location": out.urls.self, "Retry-After": "1"}
    answer = StoredResponse(202, payload, headers) if owned is not None else None
    try:
        accepted = await get_state(request).intake.create(
            job_service.Candidate(principal, job, submission.traceparent, owned, answer)
        )
    except job_service.ConcurrencyLimitError:
        admission.add_concurrency(request, principal, active=principal.concurrency)
        raise
    admission.add_concurrency(request, principal, active=accepted.active)
    return payload, headers


async def _undo(
    deps: Deps, principal: Principal, job_id: str, owned: Claim | None, *, rolled_back: bool
) -> None:
    """Give back what step 2 took and abandon the claim, unless the job exists after all."""
    if not rolled_back:
        # A lost connection or a cancel may strike after the commit: look before undoing.
        try:
            async with deps.sessionmaker() as session:
                if await session.scalar(select(Job.id).where(Job.id == job_id)) is not None:
                    return
        except (SQLAlchemyError, OSError) as error:
            # Unknown: keep the quotas taken (they never overcount by more than this job).
            log.warning("accept.undo_unknown", job_id=job_id, error=repr(error))
            return
    await deps.limiter.give_back(principal.key_id, job_id)
    if owned is not None:
        await idempotency.abandon(deps, owned)


async def _wait(
    request: Request,
    deps: Deps,
    job_id: str,
    owned: Claim | None,
    payload: str,
    headers: dict[str, str],
    seconds: int,
) -> Response:
    applied = {"Preference-Applied": f"wait={seconds}"}
    ended = get_state(request).ended
    if not await waiting.wait_for_end(deps.sessionmaker, job_id, seconds=seconds, ended=ended):
        return Response(payload, status_code=202, media_type=JSON, headers={**headers, **applied})
    async with deps.sessionmaker() as session:
        job = await job_service.get(session, job_id)
        out = await render_job(request, session, job, with_queue_position=False)
    final = out.model_dump_json()
    final_headers = {"Content-Location": out.urls.self, **applied}
    if owned is not None:
        await idempotency.store_final(deps, owned, status=200, body=final, headers=final_headers)
    return Response(final, status_code=200, media_type=JSON, headers=final_headers)
