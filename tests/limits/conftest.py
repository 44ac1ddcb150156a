"""One suite, both limiters: every test here runs on the in-process and the Redis limiter."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from aigen.limits import InProcessLimiter, Limiter
from aigen.limits.redis import RedisLimiter

# Mid-month, mid-day: far from every window edge unless a test moves the clock there.
START = datetime(2030, 1, 15, 12, 0, tzinfo=UTC).timestamp()


@dataclass
class FakeClock:
    now: float = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Limiters:
    """Makes limiters that share state as API processes would: the Redis ones share the
    server (and the test's prefix); in-process ones share nothing, so tests of sharing ask
    for `shared` and get the same in-process limiter back."""

    kind: str
    clock: FakeClock
    make_one: Callable[[], Limiter]
    made: list[Limiter] = field(default_factory=list)

    def new(self) -> Limiter:
        limiter = self.make_one()
        self.made.append(limiter)
        return limiter

    def shared(self) -> Limiter:
        return self.new() if self.kind == "redis" or not self.made else self.made[0]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def limiters(
    request: pytest.FixtureRequest, redis_url: str, redis_prefix: str
) -> AsyncIterator[Limiters]:
    clock = FakeClock()

    def make_one() -> Limiter:
        if request.param == "memory":
            return InProcessLimiter(clock=clock)
        return RedisLimiter(
            Redis.from_url(redis_url, decode_responses=True), prefix=redis_prefix, clock=clock
        )

    made = Limiters(request.param, clock, make_one)
    yield made
    for limiter in made.made:
        await limiter.aclose()


@pytest.fixture
def limiter(limiters: Limiters) -> Limiter:
    return limiters.new()


@pytest.fixture
def clock(limiters: Limiters) -> FakeClock:
    return limiters.clock
