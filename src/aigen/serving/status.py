"""HTTP answers of an upstream, translated into the provider error tree.

Shared by the OpenAI and HTTP providers, so one upstream status means one thing whoever
called it. Retryable: 408, 409, 429 and 5xx, as the OpenAI SDK's own retry policy has it.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

from .base import (
    ContentRejected,
    InvalidProviderInput,
    ProviderError,
    ProviderMisconfigured,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimitedByProvider,
)

# Upstream error codes that mean "refused by a content policy" (OpenAI, Azure OpenAI).
CONTENT_POLICY_CODES = frozenset(
    {"content_policy_violation", "content_filter", "moderation_blocked", "content_rejected"}
)


def error_for_status(
    status: int,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    upstream_code: str | None = None,
) -> ProviderError:
    """The error for an upstream answer with HTTP `status` (a 4xx or 5xx)."""
    message = f"upstream answered {status}: {message}"
    if upstream_code in CONTENT_POLICY_CODES:
        return ContentRejected(message)
    if status == 429:
        return RateLimitedByProvider(message, retry_after=retry_after(headers or {}))
    if status == 408:
        return ProviderTimeout(message)
    if status == 409 or status >= 500:
        return ProviderUnavailable(message)
    if status in (400, 413, 422):
        return InvalidProviderInput(message)
    if status in (401, 403, 404):
        # A wrong key, a key without access, or an unknown upstream model: the operator's fix.
        return ProviderMisconfigured(message)
    # Any other 4xx: permanent, under the catch-all code (the status is in the message).
    return ProviderError(message)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())
