"""A worker SIGKILLed while it holds jobs: RabbitMQ hands its unacked messages to the other
worker, which claims the jobs again with the next attempt number. Every job still ends
`completed`, captured once, with one asset set."""

from __future__ import annotations

from tests.fixtures.stack import Stack

from .deployment import MARKS, Production
from .observe import (
    assert_books_balance,
    assets_per_job,
    ledger_rows,
    post_jobs,
    s3_keys,
    wait_claimed,
    wait_ended,
)
from .queues import wait_drained

pytestmark = MARKS

SLOW = {"model": "scripted-slow", "input": {"prompt": "take your time", "max_tokens": 5}}
PRICE = 2  # scripted-slow: 2 per request, held and charged alike
JOBS = 12


async def test_a_worker_killed_holding_jobs_loses_none(
    stack: Stack, production: Production
) -> None:
    who = await production.customer(credits=1000)
    victim = stack.running("worker")[0]
    job_ids = await post_jobs(stack.api_urls(), who, [SLOW] * JOBS)
    # The scripted model answers after 1 s: the victim is mid-job when it dies.
    held = await wait_claimed(victim, job_ids)
    await stack.kill(victim)

    jobs = await wait_ended(production.sessionmaker, job_ids, timeout=90)
    assert {job.status for job in jobs.values()} == {"completed"}, stack.tails()
    # The victim's jobs were claimed again by a live worker: a later attempt finished them.
    assert all(jobs[job_id].attempt >= 2 for job_id in held)
    for job_id, kinds in (await ledger_rows(production.sessionmaker, job_ids)).items():
        assert kinds == {"hold": 1, "capture": 1, "release": 1}, job_id
    assert await assets_per_job(production.sessionmaker, job_ids) == dict.fromkeys(job_ids, 1)
    # A job run twice overwrote its object: one per job in the bucket, none orphaned.
    keys = await s3_keys(production.s3_endpoint, production.bucket, f"assets/{who.account_id}/")
    assert sorted(key.split("/")[2] for key in keys) == sorted(job_ids)
    assert await assert_books_balance(production.sessionmaker, who.account_id) == 1000 - (
        PRICE * JOBS
    )
    await wait_drained(production.namespace)
