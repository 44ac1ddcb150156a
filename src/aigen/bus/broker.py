"""The broker port. Adapters: `database` (the embedded queue) and `rabbitmq` (aio-pika).

Delivery is at least once: a handler that returns has committed its own transaction and
the message is acked; a handler that raises is retried with backoff (or after the delay
of a `Retry`) and dead-lettered after the delivery limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

from sqlalchemy.ext.asyncio import AsyncSession

from .messages import Envelope

Handler = Callable[[Envelope], Awaitable[None]]
# Called once a message is moved to its dead-letter queue, with the last error's text.
DeadLetterHook = Callable[[Envelope, str], Awaitable[None]]


class Retry(Exception):
    """Raised by a handler to be called again with this message after `delay` seconds."""

    def __init__(self, delay: float, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = delay


class Broker(Protocol):
    async def start(self) -> None:
        """Connect and declare the topology."""
        ...

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish; returns once the broker has confirmed every message."""
        ...

    async def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        stop: asyncio.Event,
        prefetch: int,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        """Run `handler` on the queue's messages until `stop` is set, then finish in hand."""
        ...

    async def ping(self) -> None:
        """Raise when the broker cannot be reached (readiness)."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class TransactionalPublisher(Protocol):
    """A broker that can publish inside the caller's database transaction (exactly once)."""

    async def publish_in(self, session: AsyncSession, envelopes: Sequence[Envelope]) -> None: ...
