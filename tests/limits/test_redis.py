"""What only the Redis limiter does: fail clearly when Redis is down."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from aigen.limits.redis import LimiterUnavailableError, RedisLimiter, _Pipelined
from tests.fixtures.scratch import free_port


@pytest.mark.redis
async def test_unreachable_redis_is_503() -> None:
    limiter = RedisLimiter(Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"))
    try:
        with pytest.raises(LimiterUnavailableError) as raised:
            await limiter.admit("k", per_minute=1)
        assert raised.value.status_code == 503
        assert raised.value.headers["Retry-After"]
        await limiter.give_back("k", "j")  # best effort: logged, not raised
    finally:
        await limiter.aclose()


@pytest.mark.redis
async def test_calls_that_arrive_together_are_each_answered(
    redis_url: str, redis_prefix: str
) -> None:
    # They share pipelines: each still gets its own decision, and the count is exact.
    limiter = RedisLimiter(Redis.from_url(redis_url, decode_responses=True), prefix=redis_prefix)
    try:
        decisions = await asyncio.gather(
            *(limiter.admit(f"k{i % 3}", per_minute=10) for i in range(60))
        )
        allowed = [d for d in decisions if d.allowed]
        assert len(allowed) == 30  # ten for each of the three keys
        for i in range(3):
            mine = [d for j, d in enumerate(decisions) if j % 3 == i]
            assert sum(d.allowed for d in mine) == 10
    finally:
        await limiter.aclose()


@pytest.mark.redis
async def test_a_server_that_lost_its_scripts_still_answers(
    redis_url: str, redis_prefix: str
) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    limiter = RedisLimiter(client, prefix=redis_prefix)
    try:
        assert (await limiter.admit("k", per_minute=2)).allowed
        await client.script_flush()  # as after a restart
        results = await asyncio.gather(*(limiter.admit("k", per_minute=2) for _ in range(3)))
        assert [d.allowed for d in results] == [True, False, False]
    finally:
        await limiter.aclose()


async def test_calls_queued_behind_an_unreachable_redis_fail_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limiter = RedisLimiter(Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"))
    tried: list[int] = []
    stuck = asyncio.Event()

    async def hung(_: object, calls: list[object]) -> list[object]:
        tried.append(len(calls))
        await stuck.wait()  # as a socket timeout would
        raise RedisConnectionError("Redis went away")

    monkeypatch.setattr(_Pipelined, "_send", hung)
    try:
        first = asyncio.ensure_future(limiter.admit("k", per_minute=5))
        await asyncio.sleep(0.05)  # the first call is in its round trip
        behind = [asyncio.ensure_future(limiter.admit("k", per_minute=5)) for _ in range(4)]
        await asyncio.sleep(0.05)
        stuck.set()
        results = await asyncio.gather(first, *behind, return_exceptions=True)
    finally:
        await limiter.aclose()
    assert all(isinstance(r, LimiterUnavailableError) for r in results)
    # The four queued behind were not sent one timeout later: they failed with the first.
    assert tried == [1]
