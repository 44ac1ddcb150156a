"""Limits kept in this process: exact within it, shared with no other (the embedded default).

With several API processes and no Redis, each process counts on its own, so a key gets
up to N times its limits; set `AIGEN_REDIS_URL` to share them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import windows
from .base import Decision, Quota
from .policy import evaluate

MAX_KEYS = 100_000


@dataclass
class _Reservation:
    # bucket → (unit, amount taken)
    taken: dict[str, tuple[str, int]] = field(default_factory=dict)
    expires_at: float = 0.0


class InProcessLimiter:
    """GCRA arrival times, quota counters and reservations in dicts."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        # bucket → (used, expires at)
        self._used: dict[str, tuple[int, float]] = {}
        self._reservations: dict[str, _Reservation] = {}

    async def admit(
        self,
        key: str,
        *,
        per_minute: int,
        quotas: Sequence[Quota] = (),
        reservation: str | None = None,
    ) -> Decision:
        now = self._clock()
        buckets = [_bucket(key, quota, now) for quota in quotas]
        used = [self._current(bucket, now) for bucket, _ in buckets]
        result = evaluate(
            now=now, per_minute=per_minute, tat=self._tat.get(key), quotas=quotas, used=used
        )
        if not result.decision.allowed:
            return result.decision
        self._tat[key] = result.new_tat
        held = _Reservation()
        for quota, (bucket, expires_at), before in zip(quotas, buckets, used, strict=True):
            if quota.cost:
                self._used[bucket] = (before + quota.cost, expires_at)
                held.taken[bucket] = (quota.unit, quota.cost)
                held.expires_at = max(held.expires_at, expires_at)
        if reservation is not None and held.taken:
            self._reservations[reservation] = held
        if len(self._tat) + len(self._used) + len(self._reservations) > MAX_KEYS:
            self._forget_stale(now)
        return result.decision

    async def give_back(self, key: str, reservation: str) -> None:
        held = self._reservations.pop(reservation, None)
        if held is not None:
            for bucket, (_unit, amount) in held.taken.items():
                self._return(bucket, amount)

    async def refund(self, key: str, reservation: str, *, credits: int) -> None:
        held = self._reservations.pop(reservation, None)
        if held is None or credits <= 0:
            return
        for bucket, (unit, amount) in held.taken.items():
            if unit == "credits":
                self._return(bucket, min(credits, amount))

    async def ping(self) -> None:
        # In this process: nothing to reach.
        return None

    async def aclose(self) -> None:
        return None

    def _current(self, bucket: str, now: float) -> int:
        used, expires_at = self._used.get(bucket, (0, 0.0))
        return used if expires_at > now else 0

    def _return(self, bucket: str, amount: int) -> None:
        if bucket in self._used:
            used, expires_at = self._used[bucket]
            self._used[bucket] = (max(0, used - amount), expires_at)

    def _forget_stale(self, now: float) -> None:
        # A key whose arrival time has passed has a full burst: forgetting it is exact, and
        # so is forgetting a counter or a reservation whose window has ended.
        self._tat = {k: tat for k, tat in self._tat.items() if tat > now}
        self._used = {k: v for k, v in self._used.items() if v[1] > now}
        self._reservations = {k: r for k, r in self._reservations.items() if r.expires_at > now}


def _bucket(key: str, quota: Quota, now: float) -> tuple[str, float]:
    window = windows.current(quota.period, now)
    return f"{key}:{quota.policy}:{window.bucket}", now + window.remaining_seconds
