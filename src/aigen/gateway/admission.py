"""Per-key limits at the edge: one limiter call per request checks every policy at once.

Most routes count the request when the key is verified (`Authenticator`). `POST
/v1/generate` counts it once the job's price is known, so that the request rate and the
job and credit quotas are checked in the same call, all or nothing; a request refused
before that (a body that does not validate) still counts, through `count_late`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Request

from aigen.backend.principal import Principal
from aigen.errors import AppError, RateLimited
from aigen.limits import Decision, PolicyState, Quota
from aigen.limits.base import Period

from .state import get_state


class RequestRateLimitedError(RateLimited):
    code = "rate_limited"
    title = "Too many requests for this key"


class QuotaExceededError(RateLimited):
    code = "quota_exceeded"
    title = "A quota of this key is used up"


def quotas_for(principal: Principal, *, jobs: int = 0, credits: int = 0) -> list[Quota]:
    """The key's quotas, each taking `jobs` or `credits` (0: only read what is left)."""
    job_limits: tuple[tuple[Period, int | None], ...] = (
        ("day", principal.jobs_per_day),
        ("month", principal.jobs_per_month),
    )
    credit_limits: tuple[tuple[Period, int | None], ...] = (
        ("day", principal.credits_per_day),
        ("month", principal.credits_per_month),
    )
    return [Quota("jobs", p, limit, jobs) for p, limit in job_limits if limit is not None] + [
        Quota("credits", p, limit, credits) for p, limit in credit_limits if limit is not None
    ]


async def admit(
    request: Request,
    principal: Principal,
    *,
    jobs: int = 0,
    credits: int = 0,
    reservation: str | None = None,
) -> Decision:
    """Count this request and take `jobs` and `credits` from the quotas, or raise 429."""
    limiter = get_state(request).deps.limiter
    request.state.uncounted = None
    decision = await limiter.admit(
        principal.key_id,
        per_minute=principal.rpm,
        quotas=quotas_for(principal, jobs=jobs, credits=credits),
        reservation=reservation,
    )
    remember(request, decision)
    if not decision.allowed:
        raise refusal(decision, principal)
    return decision


def remember(request: Request, decision: Decision) -> None:
    """Keep the decision for the route; its headers go on whatever answer leaves
    (`limit_headers`, rendered once, when the answer starts)."""
    request.state.limits = decision


def limit_headers(state: Mapping[str, Any]) -> dict[str, str]:
    """The rate-limit headers of the request whose ASGI `state` this is ({} if none)."""
    decision: Decision | None = state.get("limits")
    return decision.headers() if decision is not None else {}


def add_concurrency(request: Request, principal: Principal, *, active: int) -> None:
    """Add the concurrent-jobs policy (counted by the job service) to this answer's headers."""
    decision: Decision | None = getattr(request.state, "limits", None)
    if decision is None:
        return
    state = PolicyState(
        name="concurrency",
        limit=principal.concurrency,
        remaining=max(0, principal.concurrency - active),
        reset_seconds=None,
        window_seconds=None,
        unit="concurrent-requests",
    )
    remember(request, decision.with_policy(state))


def refusal(decision: Decision, principal: Principal) -> RateLimited:
    denied = decision.denied
    assert denied is not None
    headers = {**decision.headers(), "Retry-After": decision.retry_after_header()}
    extra = {"policy": denied.name, "limit": denied.limit}
    if denied.name == "rpm":
        return RequestRateLimitedError(
            f"more than {principal.rpm} requests per minute for this key",
            headers=headers,
            extra=extra,
        )
    return QuotaExceededError(
        f"this request would pass the key's {denied.name} quota of {denied.limit}",
        headers=headers,
        extra=extra,
    )


async def count_late(request: Request) -> AppError | None:
    """Count a request that is being refused before its limits were counted.

    Returns the 429 to answer instead when the request rate is over the limit.
    """
    principal: Principal | None = getattr(request.state, "uncounted", None)
    if principal is None:
        return None
    try:
        await admit(request, principal)
    except RateLimited as error:
        return error
    except AppError:
        return None  # the limiter is unreachable: the refusal being made stands
    return None
