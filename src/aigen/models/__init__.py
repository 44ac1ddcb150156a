"""ORM models, one class per file; importing this package registers every table."""

from .account import Account
from .api_key import ApiKey
from .asset import Asset
from .credit_entry import CreditEntry
from .idempotency_key import IdempotencyKey
from .inbox_message import InboxMessage
from .job import Job
from .outbox_message import OutboxMessage
from .queue_message import QueueMessage
from .webhook_delivery import WebhookAttempt, WebhookDelivery
from .webhook_endpoint import WebhookEndpoint

__all__ = [
    "Account",
    "ApiKey",
    "Asset",
    "CreditEntry",
    "IdempotencyKey",
    "InboxMessage",
    "Job",
    "OutboxMessage",
    "QueueMessage",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
]
