"""The limiter port and its answer, which becomes the rate-limit headers.

Headers follow the IETF httpapi draft (`RateLimit-Policy` and `RateLimit`, one list item
per policy) and the older `X-RateLimit-Limit/Remaining/Reset` trio, which can name only one
policy: the one that refused the request, else the one with the least left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

Period = Literal["day", "month"]
Unit = Literal["jobs", "credits"]


@dataclass(frozen=True, slots=True)
class Quota:
    """`limit` jobs or credits per calendar day or month (UTC) for one key.

    `cost` is what this request takes from it: 0 only reads what is left.
    """

    unit: Unit
    period: Period
    limit: int
    cost: int = 0

    @property
    def policy(self) -> str:
        return f"{self.unit}-per-{self.period}"


@dataclass(frozen=True, slots=True)
class PolicyState:
    """One named policy as the headers show it."""

    name: str
    limit: int
    remaining: int
    # Seconds until the quota is whole again; None when it has no clock (concurrency).
    reset_seconds: float | None
    window_seconds: int | None
    # The draft's `qu`: None for requests (its default).
    unit: str | None = None

    def policy_item(self) -> str:
        item = f'"{self.name}";q={self.limit}'
        if self.window_seconds is not None:
            item += f";w={self.window_seconds}"
        if self.unit is not None:
            item += f';qu="{self.unit}"'
        return item

    def state_item(self) -> str:
        item = f'"{self.name}";r={self.remaining}'
        if self.reset_seconds is not None:
            item += f";t={_seconds(self.reset_seconds)}"
        return item


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a request may pass, and the state of every policy it was checked against."""

    allowed: bool
    policies: tuple[PolicyState, ...]
    denied: PolicyState | None = None
    retry_after: float = 0.0

    def get(self, name: str) -> PolicyState | None:
        return next((p for p in self.policies if p.name == name), None)

    def with_policy(self, state: PolicyState) -> Decision:
        """This decision with one more policy (one checked elsewhere, e.g. concurrency)."""
        others = tuple(p for p in self.policies if p.name != state.name)
        return replace(self, policies=(*others, state))

    def most_restrictive(self) -> PolicyState | None:
        if self.denied is not None:
            return self.denied
        timed = [p for p in self.policies if p.reset_seconds is not None and p.limit > 0]
        if not timed:
            return None
        return min(timed, key=lambda p: (p.remaining / p.limit, p.reset_seconds or 0.0))

    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))

    def headers(self) -> dict[str, str]:
        if not self.policies:
            return {}
        headers = {
            "RateLimit-Policy": ", ".join(p.policy_item() for p in self.policies),
            "RateLimit": ", ".join(p.state_item() for p in self.policies),
        }
        main = self.most_restrictive()
        if main is not None:
            reset = main.reset_seconds if main.reset_seconds is not None else self.retry_after
            headers["X-RateLimit-Limit"] = str(main.limit)
            headers["X-RateLimit-Remaining"] = str(main.remaining)
            headers["X-RateLimit-Reset"] = str(_seconds(reset))
        return headers


def _seconds(value: float) -> int:
    return max(0, math.ceil(value - 1e-9))


class Limiter(Protocol):
    """Counts requests and reserves quota per key; shared by every process that uses it."""

    async def admit(
        self,
        key: str,
        *,
        per_minute: int,
        quotas: Sequence[Quota] = (),
        reservation: str | None = None,
    ) -> Decision:
        """Count one request and take each quota's `cost`, all or nothing.

        Nothing is counted when any policy refuses. With `reservation` (a job id), what the
        quotas gave is remembered under it for `give_back` and `refund`.
        """
        ...

    async def give_back(self, key: str, reservation: str) -> None:
        """Return all that `reservation` took (the job was not accepted after all)."""
        ...

    async def refund(self, key: str, reservation: str, *, credits: int) -> None:
        """Return `credits` of what `reservation` took from the credit quotas, at most once.

        Called when the job ends, with the part of its hold that was not charged; the
        credits go back to the day and month the job was accepted in.
        """
        ...

    async def ping(self) -> None:
        """Raise when the shared counters cannot be reached (readiness)."""
        ...

    async def aclose(self) -> None: ...
