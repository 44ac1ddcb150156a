"""Access across several API processes on the production stack (PostgreSQL and Redis):
the request rate is shared exactly and a revocation reaches every process at once.

These run on PostgreSQL only: what they test lives in Redis and in each process's key
cache, and each test starts real processes, which is slow on any database.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from aigen.backend.key import service as key_service
from aigen.config import Settings
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import Job
from tests.conftest import _drop_database, _fresh_database_url
from tests.fixtures.platform import Customer
from tests.fixtures.processes import ApiProcess, api_processes, run_cli

from .test_scale_out import GOOD, customer


def clients(apis: list[ApiProcess], who: Customer, *, connections: int) -> list[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return [
        httpx.AsyncClient(base_url=api.url, headers=who.headers, timeout=120, limits=limits)
        for api in apis
    ]


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    url, name = await _fresh_database_url(tmp_path, request.param)
    yield url
    if name:
        await _drop_database(name)


@pytest.mark.redis
@pytest.mark.slow
async def test_sixty_per_minute_across_two_processes_on_redis(
    settings: Settings, sessionmaker: Sessionmaker, redis_url: str, redis_prefix: str
) -> None:
    who = await customer(sessionmaker, settings, credits=10_000, rpm=60, concurrency=1000)
    warm = await customer(sessionmaker, settings, credits=100)
    async with api_processes(
        settings, 2, AIGEN_REDIS_URL=redis_url, AIGEN_REDIS_PREFIX=redis_prefix
    ) as apis:
        # GCRA refills one request a second: a burst is exactly 60 only if it lands within
        # a second, so the processes first warm up (imports, pools, statement caches) on
        # another key, leaving this one untouched.
        for client in clients(apis, warm, connections=1):
            async with client:
                assert (await client.post("/v1/generate", json=GOOD)).status_code == 202
        pool = clients(apis, who, connections=100)
        try:
            answers = await asyncio.gather(
                *(pool[i % 2].post("/v1/generate", json=GOOD) for i in range(100))
            )
        finally:
            for client in pool:
                await client.aclose()
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {202: 60, 429: 40}
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["policy"] == "rpm"
    assert int(refused.headers["retry-after"]) >= 1
    async with sessionmaker() as session:
        jobs = select(func.count()).select_from(Job).where(Job.api_key_id == who.key_id)
        assert await session.scalar(jobs) == 60


async def refused_everywhere(apis: list[ApiProcess], who: Customer, *, within: float) -> float:
    """Seconds until every process answers 403 for the key (fails after `within`)."""
    started = time.monotonic()
    pending = {api.url for api in apis}
    async with httpx.AsyncClient(headers=who.headers) as client, asyncio.timeout(within):
        while pending:
            for url in list(pending):
                if (await client.get(f"{url}/v1/account")).status_code == 403:
                    pending.discard(url)
            await asyncio.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture
async def revocation_channel(redis_url: str, redis_prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.mark.redis
@pytest.mark.slow
async def test_revocation_reaches_every_process_at_once_on_redis(
    settings: Settings,
    sessionmaker: Sessionmaker,
    redis_url: str,
    redis_prefix: str,
    revocation_channel: Redis,
) -> None:
    who = await customer(sessionmaker, settings, credits=10)
    # A minute of key cache: only the published revocation can explain a quick refusal.
    extra = {
        "AIGEN_REDIS_URL": redis_url,
        "AIGEN_REDIS_PREFIX": redis_prefix,
        "AIGEN_KEY_CACHE_SECONDS": "60",
    }
    async with api_processes(settings, 2, **extra) as apis:
        async with httpx.AsyncClient(headers=who.headers) as client:
            for api in apis:
                assert (await client.get(f"{api.url}/v1/account")).status_code == 200
        channel = f"{redis_prefix}keys:revoked"
        async with asyncio.timeout(10):
            while dict(await revocation_channel.pubsub_numsub(channel)).get(channel, 0) < 2:
                await asyncio.sleep(0.05)
        revoked = json.loads(
            await run_cli(settings, "keys", "revoke", who.key_id, "--json", **extra)
        )
        assert revoked["revoked_at"]
        took = await refused_everywhere(apis, who, within=5.0)
    assert took < 2.0


@pytest.mark.slow
async def test_revocation_reaches_every_process_within_5s_without_redis(
    settings: Settings, sessionmaker: Sessionmaker
) -> None:
    who = await customer(sessionmaker, settings, credits=10)
    async with api_processes(settings, 2) as apis:
        async with httpx.AsyncClient(headers=who.headers) as client:
            for api in apis:
                assert (await client.get(f"{api.url}/v1/account")).status_code == 200
        async with unit_of_work(sessionmaker) as session:
            await key_service.revoke(session, who.key_id)
        await refused_everywhere(apis, who, within=5.5)
