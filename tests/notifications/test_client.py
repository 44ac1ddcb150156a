"""`aigen.client.verify_webhook`, as a receiving developer uses it."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest

from aigen.client import WebhookVerificationError, verify_webhook
from aigen.clock import utcnow
from aigen.notifications.signing import new_secret, sign_headers

BODY = b'{"type":"ai_generation.job.failed","timestamp":"2026-01-01T00:00:00Z","data":{}}'


class TestVerifyWebhook:
    def test_returns_the_payload(self) -> None:
        secret = new_secret()
        headers = sign_headers("msg_1", utcnow(), BODY, [secret])
        assert verify_webhook(BODY, headers, secret)["type"] == "ai_generation.job.failed"

    def test_any_mapping_and_str_body(self) -> None:
        secret = new_secret()
        headers = httpx.Headers(sign_headers("msg_1", utcnow(), BODY, [secret]))
        upper = {k.upper(): v for k, v in headers.items()}
        assert verify_webhook(BODY.decode(), upper, secret)["data"] == {}

    def test_wrong_secret(self) -> None:
        headers = sign_headers("msg_1", utcnow(), BODY, [new_secret()])
        with pytest.raises(WebhookVerificationError):
            verify_webhook(BODY, headers, new_secret())

    def test_tampered_body(self) -> None:
        secret = new_secret()
        headers = sign_headers("msg_1", utcnow(), BODY, [secret])
        with pytest.raises(WebhookVerificationError):
            verify_webhook(BODY + b" ", headers, secret)

    def test_old_timestamp(self) -> None:
        secret = new_secret()
        headers = sign_headers("msg_1", utcnow() - timedelta(minutes=10), BODY, [secret])
        with pytest.raises(WebhookVerificationError, match="too old"):
            verify_webhook(BODY, headers, secret)

    @pytest.mark.parametrize("signature", ["garbage", "v1,!!!notbase64", ""])
    def test_malformed_signature(self, signature: str) -> None:
        secret = new_secret()
        headers = sign_headers("msg_1", utcnow(), BODY, [secret]) | {"webhook-signature": signature}
        with pytest.raises(WebhookVerificationError):
            verify_webhook(BODY, headers, secret)

    def test_not_an_object(self) -> None:
        secret = new_secret()
        headers = sign_headers("msg_1", utcnow(), b"[1,2]", [secret])
        with pytest.raises(WebhookVerificationError, match="JSON object"):
            verify_webhook(b"[1,2]", headers, secret)
