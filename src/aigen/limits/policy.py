"""The one decision function both limiters share: GCRA for the rate, fixed calendar windows
for the quotas, all or nothing.

GCRA (the generic cell rate algorithm): the emission interval is 60/N s and the tolerance
lets N requests through at once, so a key at rest has a burst of N and then gets one more
request every 60/N s. Its whole state is one number, the theoretical arrival time (`tat`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from . import windows
from .base import Decision, PolicyState, Quota

RPM = "rpm"


@dataclass(frozen=True, slots=True)
class Evaluation:
    decision: Decision
    # What to store when the request is admitted (unchanged otherwise).
    new_tat: float


def quota_allows(quota: Quota, used: int) -> bool:
    # A pure read (cost 0) is never refused, even over a limit that was lowered since.
    return quota.cost == 0 or used + quota.cost <= quota.limit


def rate_allows(*, now: float, per_minute: int, tat: float | None) -> bool:
    interval = 60.0 / per_minute
    start = max(tat if tat is not None else now, now)
    return start - now <= interval * (per_minute - 1)


def evaluate(
    *,
    now: float,
    per_minute: int,
    tat: float | None,
    quotas: Sequence[Quota] = (),
    used: Sequence[int] = (),
) -> Evaluation:
    """Decide from the stored state (`tat`, each quota's `used`), without changing it."""
    if per_minute <= 0:
        raise ValueError("per_minute must be positive")
    interval = 60.0 / per_minute
    tolerance = interval * (per_minute - 1)
    start = max(tat if tat is not None else now, now)
    rate_ok = start - now <= tolerance
    quotas_ok = [quota_allows(q, u) for q, u in zip(quotas, used, strict=True)]
    allowed = rate_ok and all(quotas_ok)

    refusals: list[tuple[float, PolicyState]] = []
    if allowed:
        new_tat = start + interval
        left = int((now + tolerance - start) / interval + 1e-9)
        rate = _rate_state(per_minute, left, new_tat - now)
    else:
        new_tat = tat if tat is not None else now
        left = math.floor((now + tolerance - start) / interval + 1e-9) + 1 if rate_ok else 0
        rate = _rate_state(per_minute, left, max(0.0, start - now))
        if not rate_ok:
            refusals.append((start - now - tolerance, rate))

    states = [rate]
    for quota, taken, ok in zip(quotas, used, quotas_ok, strict=True):
        window = windows.current(quota.period, now)
        after = taken + quota.cost if allowed else taken
        state = PolicyState(
            name=quota.policy,
            limit=quota.limit,
            remaining=max(0, quota.limit - after),
            reset_seconds=window.remaining_seconds,
            window_seconds=window.length_seconds,
            unit="credits" if quota.unit == "credits" else None,
        )
        states.append(state)
        if not ok:
            refusals.append((window.remaining_seconds, state))

    if allowed:
        return Evaluation(Decision(True, tuple(states)), new_tat)
    # The request needs every policy at once, so it may pass again when the last one does.
    retry_after, denied = max(refusals, key=lambda r: r[0])
    return Evaluation(Decision(False, tuple(states), denied, retry_after), new_tat)


def _rate_state(per_minute: int, remaining: int, reset: float) -> PolicyState:
    return PolicyState(
        name=RPM,
        limit=per_minute,
        remaining=max(0, min(per_minute, remaining)),
        reset_seconds=reset,
        window_seconds=60,
    )
