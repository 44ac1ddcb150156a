"""Helpers for the webhooks API tests: endpoints made through the API, messages, a notifier."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from aigen.config import Settings
from aigen.db.session import unit_of_work
from aigen.models import Account
from aigen.notifications import handlers, service
from aigen.notifications.dispatcher import Dispatcher
from aigen.notifications.service import JOB_COMPLETED
from tests.fixtures.platform import Api, Customer

from .factories import create_job


async def create_endpoint(client: httpx.AsyncClient, url: str, **body: Any) -> dict[str, Any]:
    answer = await client.post("/v1/webhooks", json={"url": url, **body})
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    return created


async def completed_job(
    api: Api, customer: Customer, *, webhook_url: str | None = None, event: str = JOB_COMPLETED
) -> str:
    """A finished job of `customer` and its messages, as the notifier's consumer makes them."""
    async with unit_of_work(api.deps.sessionmaker) as session:
        account = await session.get(Account, customer.account_id)
        assert account is not None
        job = await create_job(session, account, webhook_url=webhook_url)
        await service.enqueue(session, job=job, event_type=event)
    return job.id


def dispatcher(api: Api, settings: Settings | None = None, **options: Any) -> Dispatcher:
    """A dispatcher as `aigen notifier` wires one, with the real payload builder."""
    chosen = settings or api.deps.settings
    builder = handlers.make_payload_builder(api.deps.store, chosen)
    return Dispatcher(api.deps.sessionmaker, chosen, payload_builder=builder, **options)


@asynccontextmanager
async def notifier(api: Api, settings: Settings | None = None) -> AsyncIterator[None]:
    """The dispatcher running in the background for the duration of the block."""
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher(api, settings).run(stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def settled_log(
    client: httpx.AsyncClient, path: str, *, count: int = 1, within: float = 15.0
) -> list[dict[str, Any]]:
    """GET `path` (a delivery list) until it holds `count` messages, none pending."""
    async with asyncio.timeout(within):
        while True:
            answer = await client.get(path)
            assert answer.status_code == 200, answer.text
            data: list[dict[str, Any]] = answer.json()["data"]
            if len(data) >= count and all(d["status"] != "pending" for d in data):
                return data
            # The log lives in the database; nothing to await but time.
            await asyncio.sleep(0.05)
