"""Secrets handed to customers: API keys (DESIGN §6) and webhook signing secrets (§7)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
KEY_PREFIXES = ("aig_live_", "aig_test_")
KEY_BODY_LENGTH = 32


def new_api_key(*, live: bool = True) -> str:
    body = "".join(secrets.choice(BASE62) for _ in range(KEY_BODY_LENGTH))
    return f"{KEY_PREFIXES[0] if live else KEY_PREFIXES[1]}{body}"


def looks_like_api_key(value: str) -> bool:
    if not value.startswith(KEY_PREFIXES):
        return False
    body = value[len(KEY_PREFIXES[0]) :]
    return len(body) == KEY_BODY_LENGTH and all(c in BASE62 for c in body)


def hash_api_key(key: str, *, secret: str) -> str:
    """HMAC-SHA256 under the server secret: a leaked table reveals no usable key."""
    return hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()


def display_prefix(key: str) -> str:
    """What lists show of a key: its kind and first four characters of the body."""
    return key[: len(KEY_PREFIXES[0]) + 4]


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
