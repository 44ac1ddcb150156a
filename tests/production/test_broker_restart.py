"""RabbitMQ restarted in the middle of a run: no job is lost, and every consumer is back.

`rabbitmqctl stop_app` closes every connection from the server side, as a restart does;
while it is down the API keeps accepting (the events wait in the outbox, and the relay
retries), then `start_app` brings the durable quorum queues back with their messages.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from sqlalchemy import func, select

from aigen.bus.topology import BACKEND, NOTIFICATIONS, WORKFLOW
from aigen.models import Job
from tests.fixtures.stack import Stack
from tests.notifications.receiver import WebhookReceiverDouble

from .deployment import MARKS, Production
from .observe import assert_books_balance, ledger_kinds, post_jobs, wait_ended
from .queues import wait_consumers, wait_drained
from .servers import rabbitmqctl

pytestmark = MARKS

PACED = {"model": "scripted-paced", "input": {"prompt": "one step", "max_tokens": 5}}
PRICE = 1
BATCH = 40


async def test_a_rabbitmq_restart_mid_run_loses_no_job(
    stack: Stack, production: Production, receiver: WebhookReceiverDouble
) -> None:
    who = await production.customer(credits=10_000)
    paths = [f"/{who.account_id}/{index}" for index in range(3 * BATCH)]
    bodies = [PACED | {"webhook_url": receiver.url(path)} for path in paths]
    urls = stack.api_urls()

    job_ids = await post_jobs(urls, who, bodies[:BATCH])
    await _wait_completed(production, job_ids, at_least=BATCH // 4)
    await rabbitmqctl("stop_app")
    try:
        # Accepted while the broker is away: the events wait in the outbox.
        job_ids += await post_jobs(urls, who, bodies[BATCH : 2 * BATCH])
        async with httpx.AsyncClient(timeout=10) as client:
            ready = await client.get(f"{urls[0]}/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["broker"].startswith("error")
    finally:
        await rabbitmqctl("start_app")
    restarted = time.monotonic()
    job_ids += await post_jobs(urls, who, bodies[2 * BATCH :])

    expected = {WORKFLOW: 2, BACKEND: 1, NOTIFICATIONS: 1}
    back = await wait_consumers(production.namespace, expected, timeout=90)
    jobs = await wait_ended(production.sessionmaker, job_ids, timeout=120)
    print(
        f"\nconsumers back {back:.1f} s after start_app; every job ended"
        f" {time.monotonic() - restarted:.1f} s after it"
    )
    assert {job.status for job in jobs.values()} == {"completed"}, stack.tails()
    assert await ledger_kinds(production.sessionmaker, job_ids) == {
        "hold": len(job_ids),
        "capture": len(job_ids),
        "release": len(job_ids),
    }
    await _wait_webhooks(receiver, paths)
    for path in paths:
        assert len({request.webhook_id for request in receiver.received(path)}) == 1
    assert await assert_books_balance(production.sessionmaker, who.account_id) == 10_000 - (
        PRICE * len(job_ids)
    )
    await wait_drained(production.namespace)
    async with httpx.AsyncClient(timeout=10) as client:
        for url in urls:
            assert (await client.get(f"{url}/readyz")).status_code == 200


async def _wait_completed(production: Production, job_ids: list[str], *, at_least: int) -> None:
    """Until `at_least` of the jobs are done: the restart then lands mid-run."""
    query = select(func.count()).where(Job.id.in_(job_ids), Job.status == "completed")
    async with asyncio.timeout(60):
        while True:
            async with production.sessionmaker() as session:
                if (await session.scalar(query) or 0) >= at_least:
                    return
            await asyncio.sleep(0.1)


async def _wait_webhooks(receiver: WebhookReceiverDouble, paths: list[str]) -> None:
    async with asyncio.timeout(60):
        while any(not receiver.received(path) for path in paths):
            await asyncio.sleep(0.1)
