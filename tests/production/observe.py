"""Looking at a running deployment from outside: jobs, money, assets, logs; and posting jobs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import aioboto3
import httpx
from sqlalchemy import func, select

from aigen.backend.billing import service as billing
from aigen.db.session import Sessionmaker
from aigen.models import Asset, CreditEntry, Job
from aigen.models.job import TERMINAL
from tests.fixtures.platform import Customer
from tests.fixtures.stack import Part

RETRIES = 45


async def post_jobs(
    urls: Sequence[str], who: Customer, bodies: Sequence[dict[str, Any]], *, parallel: int = 16
) -> list[str]:
    """POST each body (round robin over the API processes); every one must be accepted.

    As a careful client does: each job has its `Idempotency-Key`, and a `503` (the shared
    PostgreSQL server out of connections, say) is tried again after its `Retry-After`;
    a retry of a job whose first answer was lost then gets that job, not a second one.
    """
    # Idle connections are dropped before uvicorn's 5 s keep-alive ends them mid-reuse.
    limits = httpx.Limits(max_connections=parallel, keepalive_expiry=2.0)
    clients = [
        httpx.AsyncClient(base_url=url, headers=who.headers, timeout=60, limits=limits)
        for url in urls
    ]
    gate = asyncio.Semaphore(parallel)

    async def post(index: int, body: dict[str, Any]) -> str:
        client = clients[index % len(clients)]
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        for _ in range(RETRIES):
            async with gate:
                answer = await client.post("/v1/generate", json=body, headers=headers)
            # 409: a first try whose claim on the key outlived it (it lapses by itself).
            if answer.status_code not in (409, 503):
                break
            await asyncio.sleep(min(1.0, float(answer.headers.get("retry-after", 1))))
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    try:
        return list(await asyncio.gather(*(post(i, body) for i, body in enumerate(bodies))))
    finally:
        for client in clients:
            await client.aclose()


async def wait_ended(
    sessionmaker: Sessionmaker, job_ids: Sequence[str], *, timeout: float = 60.0
) -> dict[str, Job]:
    """Until every job is terminal; returns them by id."""
    deadline = time.monotonic() + timeout
    while True:
        async with sessionmaker() as session:
            jobs = (await session.scalars(select(Job).where(Job.id.in_(job_ids)))).all()
        ended = {job.id: job for job in jobs if job.status in TERMINAL}
        if len(ended) == len(job_ids):
            return ended
        if time.monotonic() > deadline:
            statuses = Counter(job.status for job in jobs)
            raise AssertionError(f"{len(ended)}/{len(job_ids)} jobs ended: {statuses}")
        await asyncio.sleep(0.2)


async def ledger_kinds(sessionmaker: Sessionmaker, job_ids: Sequence[str]) -> Counter[str]:
    """How many ledger rows of each kind the jobs have, together."""
    async with sessionmaker() as session:
        kinds = await session.scalars(
            select(CreditEntry.kind).where(CreditEntry.job_id.in_(job_ids))
        )
        return Counter(kinds.all())


async def ledger_rows(
    sessionmaker: Sessionmaker, job_ids: Sequence[str]
) -> dict[str, Counter[str]]:
    """Each job → how many ledger rows of each kind it has."""
    async with sessionmaker() as session:
        rows = (
            await session.execute(
                select(CreditEntry.job_id, CreditEntry.kind).where(CreditEntry.job_id.in_(job_ids))
            )
        ).all()
    per_job: dict[str, Counter[str]] = {job_id: Counter() for job_id in job_ids}
    for job_id, kind in rows:
        per_job[job_id][kind] += 1
    return per_job


async def assets_per_job(sessionmaker: Sessionmaker, job_ids: Sequence[str]) -> Counter[str]:
    async with sessionmaker() as session:
        rows = await session.scalars(select(Asset.job_id).where(Asset.job_id.in_(job_ids)))
        return Counter(rows.all())


def logged(part: Part, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of `part` whose event is `event`."""
    lines = []
    for line in part.log_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                lines.append(record)
    return lines


def jobs_logged(part: Part, event: str, job_ids: Sequence[str]) -> set[str]:
    wanted = set(job_ids)
    return {str(r["job_id"]) for r in logged(part, event) if r.get("job_id") in wanted}


async def wait_claimed(part: Part, job_ids: Sequence[str], *, timeout: float = 30.0) -> set[str]:
    """Until the worker `part` has claimed one of the jobs; the ones it claimed so far."""
    deadline = time.monotonic() + timeout
    while not (claimed := jobs_logged(part, "workflow.claimed", job_ids)):
        assert time.monotonic() < deadline, f"{part.label} claimed none of the jobs"
        await asyncio.sleep(0.05)
    return claimed


async def s3_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    """The object keys under `prefix` in the deployment's bucket."""
    session = aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    async with session.client("s3", endpoint_url=endpoint) as client:
        listed = await client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [str(item["Key"]) for item in listed.get("Contents", [])]


async def assert_books_balance(sessionmaker: Sessionmaker, account_id: str) -> int:
    """balance == ledger sum, nothing negative, no job still holding; returns the balance."""
    async with sessionmaker() as session:
        balance = await billing.balance(session, account_id)
        assert balance == await billing.ledger_sum(session, account_id)
        assert balance >= 0
        active = await session.scalar(
            select(func.count()).where(
                Job.account_id == account_id, Job.status.in_(["pending", "processing"])
            )
        )
        assert active == 0
    return balance
