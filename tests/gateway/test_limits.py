"""Per-key limits at the edge: named policies in the headers, 429 naming the policy broken,
quotas counted at acceptance and given back when a job is refused or ends cheaper."""

from __future__ import annotations

import asyncio
import time

import httpx

from aigen.limits import InProcessLimiter
from tests.fixtures.platform import Api, Platform

from .test_errors import GOOD, assert_problem, job_count

# `scripted-text` holds 1 + 5 tokens × 1 credit = 6 credits for GOOD (max_tokens 5).
HOLD = 6


def frozen(api: Api) -> None:
    """Stop the clock of the API's limiter, so a burst's timing cannot refill it."""
    now = time.time()
    api.deps.limiter = InProcessLimiter(clock=lambda: now)


class TestRequestRate:
    async def test_sixty_of_a_hundred_at_once(self, api: Api) -> None:
        frozen(api)
        customer = await api.customer(credits=10_000, rpm=60, concurrency=1000)
        async with api.client(customer) as client:
            answers = await asyncio.gather(
                *(client.post("/v1/generate", json=GOOD) for _ in range(100))
            )
        statuses = [a.status_code for a in answers]
        assert statuses.count(202) == 60
        assert statuses.count(429) == 40
        refused = next(a for a in answers if a.status_code == 429)
        body = assert_problem(refused, 429, "rate_limited")
        assert body["policy"] == "rpm"
        assert int(refused.headers["retry-after"]) >= 1
        assert await job_count(api) == 60

    async def test_invalid_body_still_counts(self, api: Api) -> None:
        customer = await api.customer(rpm=2)
        async with api.client(customer) as client:
            first = await client.post("/v1/generate", json={"model": "x"})
            assert_problem(first, 422)
            assert first.headers["x-ratelimit-remaining"] == "1"
            second = await client.post("/v1/generate", json={**GOOD, "model": "nope"})
            assert_problem(second, 422, "unknown_model")
            third = await client.post("/v1/generate", json=GOOD)
            assert_problem(third, 429, "rate_limited")
        assert await job_count(api) == 0


class TestQuotas:
    async def test_jobs_per_day(self, api: Api) -> None:
        customer = await api.customer(jobs_per_day=2)
        async with api.client(customer) as client:
            answers = [await client.post("/v1/generate", json=GOOD) for _ in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 429]
        body = assert_problem(answers[2], 429, "quota_exceeded")
        assert body["policy"] == "jobs-per-day"
        assert body["limit"] == 2
        assert 0 < int(answers[2].headers["retry-after"]) <= 86400
        assert '"jobs-per-day";q=2;w=86400' in answers[0].headers["ratelimit-policy"]
        assert '"jobs-per-day";r=1;' in answers[0].headers["ratelimit"]
        assert '"jobs-per-day";r=0;' in answers[2].headers["ratelimit"]

    async def test_credits_count_the_hold_and_come_back_on_cancel(self, api: Api) -> None:
        customer = await api.customer(credits_per_month=2 * HOLD)
        async with api.client(customer) as client:
            first = await client.post("/v1/generate", json=GOOD)
            second = await client.post("/v1/generate", json=GOOD)
            refused = await client.post("/v1/generate", json=GOOD)
            assert [first.status_code, second.status_code] == [202, 202]
            body = assert_problem(refused, 429, "quota_exceeded")
            assert body["policy"] == "credits-per-month"
            assert '"credits-per-month";q=12;w=' in refused.headers["ratelimit-policy"]
            assert 'qu="credits"' in refused.headers["ratelimit-policy"]
            # A canceled job never ran: its whole hold goes back to the quota.
            canceled = await client.post(f"/v1/generate/{first.json()['id']}/cancel")
            assert canceled.status_code == 200
            assert (await client.post("/v1/generate", json=GOOD)).status_code == 202

    async def test_refused_job_gives_its_quota_back(self, api: Api) -> None:
        customer = await api.customer(credits=HOLD, jobs_per_day=2)
        async with api.client(customer) as client:
            assert (await client.post("/v1/generate", json=GOOD)).status_code == 202
            # Not enough credits: 402, and the job it did not make is not counted.
            for _ in range(3):
                assert_problem(await client.post("/v1/generate", json=GOOD), 402)
            account = (await client.get("/v1/account")).json()
        assert account["remaining"]["jobs-per-day"]["remaining"] == 1

    async def test_concurrency_is_a_policy_too(self, api: Api) -> None:
        customer = await api.customer(concurrency=2)
        async with api.client(customer) as client:
            first = await client.post("/v1/generate", json=GOOD)
            assert '"concurrency";q=2;qu="concurrent-requests"' in first.headers["ratelimit-policy"]
            assert '"concurrency";r=1' in first.headers["ratelimit"]
            await client.post("/v1/generate", json=GOOD)
            refused = await client.post("/v1/generate", json=GOOD)
        body = assert_problem(refused, 429, "concurrency_limit")
        assert body["policy"] == "concurrency"
        assert '"concurrency";r=0' in refused.headers["ratelimit"]


class TestQuotasWithWorker:
    async def test_unspent_credits_come_back_when_the_job_ends(self, platform: Platform) -> None:
        # GOOD holds 6 and is charged 5 (4 tokens of 5): 1 credit comes back per job.
        customer = await platform.customer(credits_per_day=HOLD + 1)
        async with platform.client(customer) as client:
            first = await client.post("/v1/generate", json=GOOD)
            assert first.status_code == 202
            assert_problem(await client.post("/v1/generate", json=GOOD), 429, "quota_exceeded")
            await platform.wait_status(first.json()["id"], {"completed"})
            await _until_credits_left(client, 2)
            small = {**GOOD, "input": {"prompt": "x", "max_tokens": 1}}  # holds 2
            assert (await client.post("/v1/generate", json=small)).status_code == 202


async def _until_credits_left(client: httpx.AsyncClient, credits: int) -> None:
    async with asyncio.timeout(10):
        while True:
            account = (await client.get("/v1/account")).json()
            if account["remaining"]["credits-per-day"]["remaining"] == credits:
                return
            await asyncio.sleep(0.05)
