"""A poison message ends in the dead-letter queue, and its job is `failed` and refunded.

Two kinds of poison for the worker's queue:
- an event whose data cannot be read (written by another version, say) but that names its
  job: the handler raises on every delivery until the delivery limit, then the message
  goes to the dead-letter queue and the dead-letter hook fails and refunds the job;
- bytes that are not an event at all: rejected at once, with no job to fail.
"""

from __future__ import annotations

import uuid

import aio_pika
from sqlalchemy import delete

from aigen.backend.job import service as job_service
from aigen.bus.messages import REQUESTED, ROUTING_KEYS, Envelope
from aigen.bus.rabbitmq import CONTENT_TYPE, ERROR_HEADER
from aigen.bus.topology import EXCHANGE, WORKFLOW, dead_letter_queue
from aigen.db.session import unit_of_work
from aigen.models import OutboxMessage
from tests.fixtures.platform import Customer
from tests.fixtures.stack import Stack

from .deployment import MARKS, Production
from .observe import assert_books_balance, ledger_rows, wait_ended
from .queues import drain_queue, wait_drained
from .servers import RABBITMQ_URL

pytestmark = MARKS

HOLD = 6
DEAD_LETTERS = dead_letter_queue(WORKFLOW)
GOOD_INPUT = {"prompt": "hello", "max_tokens": 5}


async def test_poison_messages_end_in_the_dead_letter_queue_and_fail_their_jobs(
    stack: Stack, production: Production
) -> None:
    who = await production.customer(credits=100)
    job_id = await _pending_job(production, who)
    # An event of a shape this version cannot read: it names the job, and no more.
    broken = Envelope(type=REQUESTED, data={"job_id": job_id, "account_id": who.account_id})
    garbage_id = f"garbage-{uuid.uuid4().hex}"
    await _publish(production.namespace, broken.id, broken.to_json().encode())
    await _publish(production.namespace, garbage_id, b"\x00 not an event")

    job = (await wait_ended(production.sessionmaker, [job_id], timeout=60))[job_id]
    assert job.status == "failed"
    assert job.credits_charged == 0
    assert job.error is not None
    assert job.error["code"] == "internal_error"
    ledger = await ledger_rows(production.sessionmaker, [job_id])
    assert ledger[job_id] == {"hold": 1, "release": 1}
    assert await assert_books_balance(production.sessionmaker, who.account_id) == 100

    dead = {m.message_id: m for m in await drain_queue(production.namespace, DEAD_LETTERS)}
    assert set(dead) == {broken.id, garbage_id}
    # Ours, after the delivery limit, with the last error; the garbage by the queue's own DLX.
    assert "TypeError" in str((dead[broken.id].headers or {})[ERROR_HEADER])
    assert dead[garbage_id].body == b"\x00 not an event"
    await wait_drained(production.namespace)


async def _pending_job(production: Production, who: Customer) -> str:
    """A job accepted as the API would (job and hold in one transaction), minus its event:
    the broken one the test publishes stands in for it."""
    new = job_service.NewJob(model="scripted-text", task="text", input=GOOD_INPUT, hold=HOLD)
    async with unit_of_work(production.sessionmaker) as session:
        job = (await job_service.create(session, who.principal(), new)).job
        await session.execute(delete(OutboxMessage).where(OutboxMessage.body.contains(job.id)))
    return job.id


async def _publish(namespace: str, message_id: str, body: bytes) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(f"{namespace}{EXCHANGE}", ensure=False)
        message = aio_pika.Message(body, message_id=message_id, content_type=CONTENT_TYPE)
        await exchange.publish(message, ROUTING_KEYS[REQUESTED], mandatory=True)
        await channel.close()
    finally:
        await connection.close()
