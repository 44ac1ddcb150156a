"""Per-key request rate limits: GCRA (a burst of N, then N per minute), DESIGN §6.

`InProcessLimiter` keeps the state in this process (the embedded default); a Redis
implementation shares it across API processes. Both answer the same `Decision`, which
becomes the IETF `RateLimit-Policy` / `RateLimit` headers and `X-RateLimit-*`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str
    limit: int
    remaining: int
    reset_seconds: float
    retry_after: float = 0.0
    window_seconds: int = 60

    def headers(self) -> dict[str, str]:
        reset = max(0, math.ceil(self.reset_seconds))
        return {
            "RateLimit-Policy": f'"{self.policy}";q={self.limit};w={self.window_seconds}',
            "RateLimit": f'"{self.policy}";r={self.remaining};t={reset}',
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(reset),
        }


class Limiter(Protocol):
    async def hit(self, key: str, *, per_minute: int) -> Decision:
        """Count one request against `key`; `allowed` is False when over the limit."""
        ...

    async def aclose(self) -> None: ...


def gcra(tat: float, now: float, *, per_minute: int) -> tuple[bool, float, int, float, float]:
    """One GCRA step: (allowed, new theoretical arrival time, remaining, reset, retry after).

    The emission interval is 60/N s and the tolerance lets N requests through at once, so
    a key at rest has a full burst of N and then refills one request every 60/N s.
    """
    interval = 60.0 / per_minute
    tolerance = interval * (per_minute - 1)
    start = max(tat, now)
    if start - now > tolerance:
        return False, tat, 0, tat - now, start - now - tolerance
    new_tat = start + interval
    remaining = int((now + tolerance - start) / interval + 1e-9)
    return True, new_tat, remaining, new_tat - now, 0.0


class InProcessLimiter:
    """GCRA state in a dict: exact within one process, nothing shared beyond it."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._tat: dict[str, float] = {}
        self._clock = clock

    async def hit(self, key: str, *, per_minute: int) -> Decision:
        now = self._clock()
        allowed, tat, remaining, reset, retry_after = gcra(
            self._tat.get(key, now), now, per_minute=per_minute
        )
        self._tat[key] = tat
        if len(self._tat) > 100_000:
            self._forget_idle(now)
        return Decision(
            allowed=allowed,
            policy="rpm",
            limit=per_minute,
            remaining=remaining,
            reset_seconds=reset,
            retry_after=retry_after,
        )

    def _forget_idle(self, now: float) -> None:
        # A key whose arrival time has passed has a full bucket: forgetting it is exact.
        for key in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[key]

    async def aclose(self) -> None:
        return None
