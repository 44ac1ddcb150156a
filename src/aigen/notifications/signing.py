"""Standard Webhooks signatures (standardwebhooks.com), made by the `standardwebhooks` package.

Each message is signed with every secret in force: during a rotation the old and the new
secret both sign, so a receiver holding either one verifies (`webhook-signature` then
reads `v1,<sig> v1,<sig2>`).
"""

from __future__ import annotations

import base64
import secrets as _secrets
from collections.abc import Sequence
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh signing secret: `whsec_` + base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(24)).decode("ascii")


def sign_headers(
    msg_id: str, timestamp: datetime, body: bytes, secrets: Sequence[str]
) -> dict[str, str]:
    """The `webhook-id`, `webhook-timestamp` and `webhook-signature` headers for `body`.

    `msg_id` stays the same on every retry of one message, so receivers can deduplicate;
    `timestamp` is the attempt's time (receivers refuse ones older than a few minutes).
    """
    if not secrets:
        raise ValueError("at least one secret is needed to sign a webhook")
    # The package reads the datetime as UTC wall time, so hand it UTC.
    when = timestamp.astimezone(UTC) if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
    text = body.decode("utf-8")
    signatures = dict.fromkeys(Webhook(secret).sign(msg_id, when, text) for secret in secrets)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": " ".join(signatures),
    }
