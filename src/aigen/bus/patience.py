"""Consumers wait out an unreachable database instead of dead-lettering good messages.

A handler that fails counts toward the delivery limit, and at the limit its message goes
to the dead-letter queue. An outage longer than the backoff schedule (five tries over
some fifteen seconds by default) would so send every result event that arrives meanwhile
to the `.dlq`, leaving its job `processing` with its credits held. `patient` turns the
database's unreachability into a `Retry`, which counts toward no limit: the message comes
back after `delay` until the database answers. Every other error still counts.
"""

from __future__ import annotations

import structlog

from aigen.db.errors import unreachable

from .broker import Handler, Retry
from .messages import Envelope

log = structlog.get_logger(__name__)


def patient(handler: Handler, *, delay: float) -> Handler:
    """`handler`, asking to be called again after `delay` s while the database is away."""

    async def handle(envelope: Envelope) -> None:
        try:
            await handler(envelope)
        except Exception as exc:
            if not unreachable(exc):
                raise
            log.warning(
                "consumer.database_unreachable",
                event_id=envelope.id,
                event_type=envelope.type,
                error=repr(exc),
            )
            raise Retry(delay, "the database is unreachable") from exc

    return handle
