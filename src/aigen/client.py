"""Helpers for developers who receive aigen webhooks.

```python
from aigen.client import WebhookVerificationError, verify_webhook

event = verify_webhook(request_body, request.headers, "whsec_...")
```

`verify_webhook` checks the Standard Webhooks signature and the timestamp (at most five
minutes off) and returns the parsed payload `{type, timestamp, data}`. Deduplicate on the
`webhook-id` header: it is the same on every retry of one message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

__all__ = ["WebhookVerificationError", "verify_webhook"]


def verify_webhook(body: bytes | str, headers: Mapping[str, str], secret: str) -> dict[str, Any]:
    """Verify a received webhook and return its JSON payload.

    `body` must be the raw request body, exactly as received; `headers` may be any
    mapping (names are matched without regard to case). Raises `WebhookVerificationError`
    when a header is missing, the timestamp is too old or too new, or no signature matches.
    """
    webhook = Webhook(secret)
    try:
        payload = webhook.verify(body, {str(k): str(v) for k, v in headers.items()})
    except ValueError as exc:
        # A malformed signature header or body makes the package raise plain ValueErrors;
        # to a receiver they are one more unverifiable message.
        raise WebhookVerificationError(f"malformed webhook: {exc}") from exc
    if not isinstance(payload, dict):
        raise WebhookVerificationError("the webhook payload is not a JSON object")
    return payload
