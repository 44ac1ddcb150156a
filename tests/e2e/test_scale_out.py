"""Money across several API processes (issue 4's acceptance): a flood of requests against
one balance, spread over two real `aigen api` processes sharing the database, accepts
exactly what the balance pays for, and the books balance once every job has ended."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from aigen.backend.account import service as account_service
from aigen.backend.billing import service as billing
from aigen.backend.key import service as key_service
from aigen.config import Settings
from aigen.db.session import Sessionmaker, unit_of_work
from aigen.models import Account, CreditEntry, Job
from tests.fixtures.platform import Customer
from tests.fixtures.processes import api_processes

GOOD = {"model": "scripted-text", "input": {"prompt": "hello", "max_tokens": 5}}
HOLD = 6  # 1 per request + 5 output tokens at 1 credit each


async def customer(
    sessionmaker: Sessionmaker, settings: Settings, *, credits: int, **key_options: object
) -> Customer:
    async with unit_of_work(sessionmaker) as session:
        account = await account_service.create(session, "load", credits=credits)
        row, key = await key_service.create(
            session,
            account_id=account.id,
            secret=settings.resolved_secret(),
            **key_options,  # type: ignore[arg-type]
        )
    return Customer(account.id, key, row.id)


async def watch_balance(url: str, account_id: str, lowest: list[int], stop: asyncio.Event) -> None:
    # A plain engine: on SQLite, aigen's own begins every transaction IMMEDIATE (a write
    # lock), and this watcher must not slow down the writers it watches.
    engine = create_async_engine(url)
    try:
        while not stop.is_set():
            async with engine.connect() as connection:
                balance = await connection.scalar(
                    select(Account.balance).where(Account.id == account_id)
                )
            lowest.append(min(lowest[-1], int(balance or 0)))
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()


@pytest.mark.slow
async def test_2000_posts_on_two_processes_accept_exactly_what_is_paid_for(
    settings: Settings, sessionmaker: Sessionmaker
) -> None:
    who = await customer(
        sessionmaker, settings, credits=500 * HOLD, rpm=100_000, concurrency=10_000
    )
    lowest = [500 * HOLD]
    stop = asyncio.Event()
    # All 2,000 are sent at once, 100 connections a process at a time: more in flight only
    # queue for the database pool (20 connections a process). aiohttp rather than httpx,
    # whose pool does not keep up with thousands of requests at once.
    async with api_processes(settings, 2) as apis, contextlib.AsyncExitStack() as stack:
        sessions = [
            await stack.enter_async_context(
                aiohttp.ClientSession(
                    api.url,
                    headers=who.headers,
                    connector=aiohttp.TCPConnector(limit=100),
                    timeout=aiohttp.ClientTimeout(total=300),
                )
            )
            for api in apis
        ]

        async def call(index: int, path: str, body: object = None) -> tuple[int, dict[str, Any]]:
            # As a client should, a 503 is retried after `Retry-After`: the database server is
            # shared with other test runs and may be out of connections, which refuses the
            # request before it writes anything.
            for _ in range(20):
                async with sessions[index % 2].post(path, json=body) as answer:
                    if answer.status != 503:
                        return answer.status, await answer.json(content_type=None)
                    await asyncio.sleep(float(answer.headers.get("Retry-After", "1")))
            raise AssertionError(f"{path} still 503 after 20 tries")

        watcher = asyncio.create_task(
            watch_balance(settings.database_url, who.account_id, lowest, stop)
        )
        try:
            started = time.monotonic()
            answers = await asyncio.gather(*(call(i, "/v1/generate", GOOD) for i in range(2000)))
            took = time.monotonic() - started
            statuses = Counter(status for status, _ in answers)
            print(f"\n2000 POSTs on 2 processes: {dict(statuses)} in {took:.1f} s")
            assert statuses == {202: 500, 402: 1500}
            assert {body["code"] for status, body in answers if status == 402} == {
                "insufficient_credits"
            }
            async with sessionmaker() as session:
                assert await billing.balance(session, who.account_id) == 0
                assert await billing.ledger_sum(session, who.account_id) == 0
                assert await session.scalar(select(func.count()).select_from(Job)) == 500

            # End every job: cancel them all, through both processes.
            accepted = [body["id"] for status, body in answers if status == 202]
            canceled = await asyncio.gather(
                *(call(i, f"/v1/generate/{job_id}/cancel") for i, job_id in enumerate(accepted))
            )
            assert {status for status, _ in canceled} == {200}
        finally:
            stop.set()
            await watcher
    assert min(lowest) >= 0
    async with sessionmaker() as session:
        balance = await billing.balance(session, who.account_id)
        assert balance == await billing.ledger_sum(session, who.account_id) == 500 * HOLD
        kinds = Counter(
            (
                await session.scalars(
                    select(CreditEntry.kind).where(CreditEntry.job_id.is_not(None))
                )
            ).all()
        )
        assert kinds == {"hold": 500, "release": 500}
