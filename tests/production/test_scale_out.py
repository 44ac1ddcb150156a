"""2 `api` + 2 `worker` + `backend` + `notifier` + `relay` processes on PostgreSQL, RabbitMQ,
Redis and S3 (moto): 300 jobs through the scripted provider, each with a webhook.

The jobs come from four customers at once, as a shared deployment sees them. (One key's
acceptances are serialised on its rows, by design; `tests/e2e/test_scale_out.py` pushes
a single key.)
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.fixtures.platform import Customer
from tests.fixtures.stack import Stack
from tests.notifications.receiver import Answer, WebhookReceiverDouble

from .deployment import MARKS, Production
from .observe import assert_books_balance, assets_per_job, ledger_rows, post_jobs, wait_ended
from .queues import wait_drained

pytestmark = MARKS

JOBS = 300
CUSTOMERS = 4
BODY = {"model": "scripted-text", "input": {"prompt": "hello", "max_tokens": 5}}
HOLD, PRICE = 6, 5  # 1 + 5 output tokens held; 1 + 4 words charged
FAIL_EVERY = 10


async def test_300_jobs_complete_with_a_webhook_each(
    stack: Stack, production: Production, receiver: WebhookReceiverDouble
) -> None:
    share = JOBS // CUSTOMERS
    customers = [await production.customer(credits=share * HOLD) for _ in range(CUSTOMERS)]
    paths = {who.account_id: [f"/{who.account_id}/{i}" for i in range(share)] for who in customers}
    every_path = [path for own in paths.values() for path in own]
    # Every tenth endpoint fails its first attempt: the retry must carry the same webhook-id.
    failing = set(every_path[::FAIL_EVERY])
    for path in failing:
        receiver.script(path, Answer(status=503))

    started = time.monotonic()
    posted = await asyncio.gather(
        *(
            post_jobs(
                stack.api_urls(),
                who,
                [BODY | {"webhook_url": receiver.url(path)} for path in paths[who.account_id]],
            )
            for who in customers
        )
    )
    accepted = time.monotonic() - started
    job_ids = [job_id for own in posted for job_id in own]
    jobs = await wait_ended(production.sessionmaker, job_ids, timeout=150)
    ended = time.monotonic() - started
    await _wait_webhooks(receiver, every_path, JOBS + len(failing))
    notified = time.monotonic() - started
    print(
        f"\n{JOBS} jobs on {len(stack.api_urls())} api processes: accepted in {accepted:.1f} s,"
        f" all completed in {ended:.1f} s, every webhook delivered in {notified:.1f} s"
    )

    assert {job.status for job in jobs.values()} == {"completed"}
    assert {job.credits_charged for job in jobs.values()} == {PRICE}
    webhook_ids: set[str] = set()
    for who, own in zip(customers, posted, strict=True):
        own_paths = paths[who.account_id]
        webhook_ids |= await _assert_webhooks(stack, receiver, who, own, own_paths, failing)
        balance = await assert_books_balance(production.sessionmaker, who.account_id)
        assert balance == share * (HOLD - PRICE)
    assert len(webhook_ids) == JOBS
    for job_id, kinds in (await ledger_rows(production.sessionmaker, job_ids)).items():
        assert kinds == {"hold": 1, "capture": 1, "release": 1}, job_id
    assert await assets_per_job(production.sessionmaker, job_ids) == dict.fromkeys(job_ids, 1)
    await wait_drained(production.namespace)


async def _assert_webhooks(
    stack: Stack,
    receiver: WebhookReceiverDouble,
    who: Customer,
    job_ids: list[str],
    paths: list[str],
    failing: set[str],
) -> set[str]:
    """One message per job, signed with the account's secret; its webhook-ids."""
    async with httpx.AsyncClient(base_url=stack.api_urls()[0], headers=who.headers) as client:
        secret = (await client.get("/v1/webhooks/default/secret")).json()["key"]
        # An asset is in S3 and its presigned URL (minted on this read) serves it.
        job = (await client.get(f"/v1/generate/{job_ids[0]}")).json()
        assert (await client.get(job["assets"][0]["url"])).text == "four score and seven"
    webhook_ids = set()
    for path, job_id in zip(paths, job_ids, strict=True):
        requests = receiver.received(path)
        assert len(requests) == (2 if path in failing else 1)
        assert len({request.webhook_id for request in requests}) == 1
        payload = requests[-1].verify(secret)
        assert payload["type"] == "ai_generation.job.completed"
        assert payload["data"]["id"] == job_id
        webhook_ids.add(requests[0].webhook_id)
    return webhook_ids


async def _wait_webhooks(
    receiver: WebhookReceiverDouble, paths: list[str], count: int, *, within: float = 60.0
) -> None:
    wanted = set(paths)
    deadline = time.monotonic() + within
    while (got := sum(r.path in wanted for r in receiver.received())) < count:
        assert time.monotonic() < deadline, f"{got}/{count} webhooks arrived"
        await asyncio.sleep(0.1)
