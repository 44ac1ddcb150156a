"""Each event delivered twice to each consumer changes nothing the second time.

After a run, every event of the account (requested, completed, failed, canceled) is
published again straight to RabbitMQ with its CloudEvents id, as a relay that crashed
between publishing and stamping would do: the worker, the backend and the notifier each
recognise it by its id, and the database, the ledger and the webhooks stay as they were.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import httpx
from sqlalchemy import func, select

from aigen.bus.rabbitmq import CONTENT_TYPE
from aigen.bus.topology import EXCHANGE
from aigen.models import Asset, CreditEntry, InboxMessage, Job, OutboxMessage, WebhookDelivery
from tests.fixtures.stack import Stack
from tests.notifications.receiver import WebhookReceiverDouble

from .deployment import MARKS, Production
from .observe import post_jobs, wait_ended
from .queues import wait_drained
from .servers import RABBITMQ_URL

pytestmark = MARKS

TEXT = {"model": "scripted-text", "input": {"prompt": "hello", "max_tokens": 5}}
BROKEN = {"model": "scripted-broken", "input": {"prompt": "no luck", "max_tokens": 5}}
# Never done before the test cancels it, however loaded the machine.
STUCK = {"model": "scripted-stuck", "input": {"prompt": "never mind", "max_tokens": 5}}


async def test_each_event_delivered_twice_changes_nothing(
    stack: Stack, production: Production, receiver: WebhookReceiverDouble
) -> None:
    who = await production.customer(credits=1000)
    urls = stack.api_urls()
    kinds = [TEXT] * 6 + [BROKEN] * 2 + [STUCK] * 2
    paths = [f"/{who.account_id}/{index}" for index in range(len(kinds))]
    bodies = [
        kind | {"webhook_url": receiver.url(path)} for kind, path in zip(kinds, paths, strict=True)
    ]
    job_ids = await post_jobs(urls, who, bodies)
    async with httpx.AsyncClient(base_url=urls[0], headers=who.headers) as client:
        for job_id in job_ids[-2:]:
            assert (await client.post(f"/v1/generate/{job_id}/cancel")).status_code == 200
    jobs = await wait_ended(production.sessionmaker, job_ids)
    assert [jobs[job_id].status for job_id in job_ids] == [
        *["completed"] * 6,
        *["failed"] * 2,
        *["canceled"] * 2,
    ]
    await _wait_webhooks(receiver, paths)
    await wait_drained(production.namespace)
    before = await _snapshot(production, who.account_id)
    webhooks_before = len(receiver.received())

    events = await _events(production, who.account_id)
    assert {row.type for row in events} == {
        "AIGenerationJobRequested",
        "AIGenerationJobCompleted",
        "AIGenerationJobFailed",
        "AIGenerationJobCanceled",
    }
    await _publish_again(production.namespace, events)
    # A job of another account, after the duplicates in every queue: once it has ended and
    # been notified, every consumer has taken its duplicates.
    other = await production.customer(credits=100)
    probe = await post_jobs(urls, other, [TEXT | {"webhook_url": receiver.url("/probe")}])
    await wait_ended(production.sessionmaker, probe)
    await _wait_webhooks(receiver, ["/probe"])
    await wait_drained(production.namespace)

    assert await _snapshot(production, who.account_id) == before
    assert len(receiver.received()) == webhooks_before + 1


async def _events(production: Production, account_id: str) -> list[OutboxMessage]:
    async with production.sessionmaker() as session:
        rows = await session.scalars(
            select(OutboxMessage).where(OutboxMessage.account_id == account_id)
        )
        return list(rows.all())


async def _publish_again(namespace: str, events: list[OutboxMessage]) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(f"{namespace}{EXCHANGE}", ensure=False)
        for event in events:
            message = aio_pika.Message(
                event.body.encode(),
                message_id=event.event_id,
                content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, event.routing_key, mandatory=True)
        await channel.close()
    finally:
        await connection.close()


async def _snapshot(production: Production, account_id: str) -> dict[str, Any]:
    """Everything a consumer could change for the account, in comparable form."""
    async with production.sessionmaker() as session:

        async def rows(*columns: Any, where: Any) -> list[tuple[Any, ...]]:
            result = await session.execute(select(*columns).where(where).order_by(*columns))
            return [tuple(row) for row in result.all()]

        job_ids = select(Job.id).where(Job.account_id == account_id)
        event_ids = select(OutboxMessage.event_id).where(OutboxMessage.account_id == account_id)
        return {
            "jobs": await rows(
                Job.id,
                Job.status,
                Job.attempt,
                Job.credits_charged,
                Job.updated_at,
                where=Job.account_id == account_id,
            ),
            "ledger": await rows(
                CreditEntry.id,
                CreditEntry.kind,
                CreditEntry.amount,
                where=CreditEntry.account_id == account_id,
            ),
            "assets": await rows(
                Asset.job_id, Asset.index, Asset.sha256, where=Asset.job_id.in_(job_ids)
            ),
            "deliveries": await rows(
                WebhookDelivery.id,
                WebhookDelivery.status,
                WebhookDelivery.attempts,
                where=WebhookDelivery.account_id == account_id,
            ),
            "inbox": await session.scalar(
                select(func.count()).where(InboxMessage.event_id.in_(event_ids))
            ),
            "outbox": await session.scalar(
                select(func.count()).where(OutboxMessage.account_id == account_id)
            ),
        }


async def _wait_webhooks(receiver: WebhookReceiverDouble, paths: list[str]) -> None:
    async with asyncio.timeout(60):
        while any(not receiver.received(path) for path in paths):
            await asyncio.sleep(0.1)
