"""RabbitMQ from outside the deployment: queue depths and consumers (a passive declare of
each queue of the namespace), and what a dead-letter queue holds."""

from __future__ import annotations

import asyncio
import time

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from aigen.bus.topology import BINDINGS

from .servers import RABBITMQ_URL, namespace_broker


async def queue_state(namespace: str) -> dict[str, tuple[int, int]]:
    """Every queue of `namespace` → (ready messages, consumers), by passive declare."""
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    try:
        channel = await connection.channel()
        state = {}
        for name in namespace_broker(namespace).queue_names():
            queue = await channel.declare_queue(name, passive=True)
            result = queue.declaration_result
            state[name] = (result.message_count or 0, result.consumer_count or 0)
        await channel.close()
        return state
    finally:
        await connection.close()


async def wait_drained(namespace: str, *, timeout: float = 30.0) -> None:
    """Until no queue holds a message, twice in a row (a retry may be between rungs)."""
    quiet = 0
    state: dict[str, tuple[int, int]] = {}
    deadline = time.monotonic() + timeout
    while quiet < 2:
        assert time.monotonic() < deadline, f"queues not drained: {state}"
        await asyncio.sleep(0.3)
        state = await queue_state(namespace)
        quiet = quiet + 1 if all(ready == 0 for ready, _ in state.values()) else 0


async def consumers(namespace: str) -> dict[str, int]:
    """The consumer queues (workflow, backend, notifications) → consumers subscribed."""
    state = await queue_state(namespace)
    return {queue: state[f"{namespace}{queue}"][1] for queue in BINDINGS}


async def wait_consumers(
    namespace: str, expected: dict[str, int], *, timeout: float = 60.0
) -> float:
    """Until each consumer queue has `expected` consumers; returns the seconds it took."""
    started = time.monotonic()
    while (seen := await consumers(namespace)) != expected:
        assert time.monotonic() - started < timeout, f"consumers {seen}, expected {expected}"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def drain_queue(namespace: str, queue: str) -> list[AbstractIncomingMessage]:
    """Take every message out of one queue of `namespace` (a dead-letter queue, say)."""
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    try:
        channel = await connection.channel()
        amqp_queue = await channel.get_queue(f"{namespace}{queue}", ensure=False)
        taken = []
        while (message := await amqp_queue.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        await channel.close()
        return taken
    finally:
        await connection.close()
