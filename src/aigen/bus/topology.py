"""Which consumer queue receives which routing key (DESIGN §5); shared by every broker."""

from __future__ import annotations

from .messages import CANCELED, COMPLETED, FAILED, REQUESTED, ROUTING_KEYS

EXCHANGE = "aigen.events"
WORKFLOW = "aigen.workflow"
BACKEND = "aigen.backend"
NOTIFICATIONS = "aigen.notifications"

_RESULTS = [ROUTING_KEYS[COMPLETED], ROUTING_KEYS[FAILED], ROUTING_KEYS[CANCELED]]

BINDINGS: dict[str, list[str]] = {
    WORKFLOW: [ROUTING_KEYS[REQUESTED]],
    BACKEND: list(_RESULTS),
    NOTIFICATIONS: list(_RESULTS),
}


def queues_for(routing_key: str) -> list[str]:
    return [queue for queue, keys in BINDINGS.items() if routing_key in keys]


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"
