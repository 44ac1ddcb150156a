"""What only the Redis limiter does: fail clearly when Redis is down."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from aigen.limits.redis import LimiterUnavailableError, RedisLimiter
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
