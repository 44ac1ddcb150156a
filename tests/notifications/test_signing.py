"""Standard Webhooks headers, checked with the `standardwebhooks` package's own verifier."""

from __future__ import annotations

import base64
from datetime import timedelta, timezone

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from aigen.clock import utcnow
from aigen.notifications.signing import new_secret, sign_headers

BODY = b'{"type":"ai_generation.job.completed","data":{"id":"job_1","note":"h\xc3\xa9"}}'


class TestNewSecret:
    def test_form(self) -> None:
        secret = new_secret()
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24

    def test_unique(self) -> None:
        assert len({new_secret() for _ in range(50)}) == 50


class TestSignHeaders:
    def test_verifies(self) -> None:
        secret = new_secret()
        now = utcnow()
        headers = sign_headers("msg_1", now, BODY, [secret])
        assert headers["webhook-id"] == "msg_1"
        assert headers["webhook-timestamp"] == str(int(now.timestamp()))
        assert headers["webhook-signature"].startswith("v1,")
        assert Webhook(secret).verify(BODY, headers)["data"]["id"] == "job_1"

    def test_every_secret_of_a_rotation_verifies(self) -> None:
        old, new = new_secret(), new_secret()
        headers = sign_headers("msg_1", utcnow(), BODY, [new, old])
        assert len(headers["webhook-signature"].split(" ")) == 2
        for secret in (old, new):
            Webhook(secret).verify(BODY, headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(new_secret()).verify(BODY, headers)

    def test_same_secret_twice_signs_once(self) -> None:
        secret = new_secret()
        headers = sign_headers("msg_1", utcnow(), BODY, [secret, secret])
        assert len(headers["webhook-signature"].split(" ")) == 1

    def test_timestamp_in_another_zone(self) -> None:
        secret = new_secret()
        when = utcnow().astimezone(timezone(timedelta(hours=-5)))
        headers = sign_headers("msg_1", when, BODY, [secret])
        Webhook(secret).verify(BODY, headers)

    def test_tampered_body_fails(self) -> None:
        secret = new_secret()
        headers = sign_headers("msg_1", utcnow(), BODY, [secret])
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(BODY.replace(b"job_1", b"job_2"), headers)

    def test_needs_a_secret(self) -> None:
        with pytest.raises(ValueError, match="secret"):
            sign_headers("msg_1", utcnow(), BODY, [])
