"""SIGTERM: a part stops taking work, finishes what it holds, and exits 0."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest
from sqlalchemy import select

from aigen.models import Job
from tests.fixtures.stack import Stack

from .deployment import MARKS, Production
from .observe import jobs_logged, post_jobs, wait_claimed, wait_ended
from .queues import wait_drained

pytestmark = MARKS

SLOW = {"model": "scripted-slow", "input": {"prompt": "take your time", "max_tokens": 5}}
WORKER_CONCURRENCY = 4  # the default prefetch of a worker: what it can hold at once


async def test_worker_finishes_the_jobs_it_holds_and_exits_0(
    stack: Stack, production: Production
) -> None:
    who = await production.customer(credits=1000)
    victim = stack.running("worker")[0]
    # More than both workers can hold at once, so there is work left to refuse.
    job_ids = await post_jobs(stack.api_urls(), who, [SLOW] * 16)
    await wait_claimed(victim, job_ids)

    assert await stack.terminate(victim, timeout=30) == 0, victim.log_text()[-3000:]
    claimed = jobs_logged(victim, "workflow.claimed", job_ids)
    # It took no new work after the signal: at most what it held then.
    assert len(claimed) <= WORKER_CONCURRENCY
    # And it finished every job it held: no other worker had to run them again.
    assert jobs_logged(victim, "workflow.finished", job_ids) == claimed
    jobs = await wait_ended(production.sessionmaker, job_ids, timeout=60)
    assert {job.status for job in jobs.values()} == {"completed"}
    assert {jobs[job_id].attempt for job_id in claimed} == {1}
    await wait_drained(production.namespace)


async def test_api_answers_the_request_in_hand_and_exits_0(
    stack: Stack, production: Production
) -> None:
    who = await production.customer(credits=1000)
    victim = stack.running("api")[0]
    assert victim.url is not None
    async with httpx.AsyncClient(base_url=victim.url, headers=who.headers, timeout=30) as client:
        # `Prefer: wait` holds the request open until the job ends, a second or more.
        waiting = asyncio.create_task(
            client.post("/v1/generate", json=SLOW, headers={"Prefer": "wait=20"})
        )
        await _wait_for_a_job(production, who.account_id)
        victim.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        # It takes no new connection...
        async with httpx.AsyncClient(base_url=victim.url) as fresh:
            with pytest.raises(httpx.ConnectError):
                await fresh.get("/healthz")
        # ...and answers the one in hand in full.
        answer = await waiting
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "completed"
    assert await asyncio.wait_for(victim.process.wait(), 30) == 0, victim.log_text()[-3000:]
    # The other API process still serves.
    await post_jobs(stack.api_urls(), who, [SLOW])


async def _wait_for_a_job(production: Production, account_id: str) -> None:
    """Until the API has accepted a job of the account (the request is in hand)."""
    query = select(Job.id).where(Job.account_id == account_id).limit(1)
    async with asyncio.timeout(30):
        while True:
            async with production.sessionmaker() as session:
                if await session.scalar(query) is not None:
                    return
            await asyncio.sleep(0.02)
