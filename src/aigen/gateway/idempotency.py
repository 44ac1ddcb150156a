"""The `Idempotency-Key` header at the edge: parse it, fingerprint the body, replay answers.

Each database step runs in a short transaction of its own (see
`aigen.backend.idempotency.service`), never inside the job's.
"""

from __future__ import annotations

import hashlib
import json

import structlog
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response

from aigen.backend.idempotency import service as idempotency_service
from aigen.backend.idempotency.service import Claim, StoredResponse
from aigen.bootstrap import Deps
from aigen.clock import utcnow
from aigen.db.session import unit_of_work
from aigen.errors import BadRequest

log = structlog.get_logger(__name__)

REPLAYED_HEADER = "Idempotent-Replayed"


class InvalidIdempotencyKeyError(BadRequest):
    code = "invalid_idempotency_key"
    title = "Invalid Idempotency-Key"


def parse_key(value: str | None) -> str | None:
    """The key as sent, or as the draft's quoted string (`"…"`); 1–255 printable ASCII."""
    if value is None:
        return None
    key = value.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not 1 <= len(key) <= 255 or not (key.isascii() and key.isprintable()):
        raise InvalidIdempotencyKeyError(
            "Idempotency-Key must be 1 to 255 printable ASCII characters (a UUID is ideal)"
        )
    return key


def fingerprint(raw: bytes) -> str:
    """The body's SHA-256, insensitive to key order and whitespace."""
    try:
        canonical = json.dumps(
            json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    except ValueError:
        canonical = raw
    return hashlib.sha256(canonical).hexdigest()


def replay(stored: StoredResponse) -> Response:
    return Response(
        stored.body,
        status_code=stored.status,
        media_type="application/json",
        headers={**stored.headers, REPLAYED_HEADER: "true"},
    )


async def claim(deps: Deps, *, api_key_id: str, key: str, digest: str) -> Claim | StoredResponse:
    async with unit_of_work(deps.sessionmaker) as session:
        return await idempotency_service.claim(
            session, api_key_id=api_key_id, key=key, request_hash=digest
        )


async def stored(deps: Deps, *, api_key_id: str, key: str, digest: str) -> StoredResponse | None:
    """The response kept for this key and body, if there is one (reads only)."""
    async with deps.sessionmaker() as session:
        row = await idempotency_service.find(session, api_key_id=api_key_id, key=key)
    if (
        row is None
        or row.request_hash != digest
        or row.expires_at <= utcnow()
        or row.response_status is None
        or row.response_body is None
    ):
        return None
    return StoredResponse(row.response_status, row.response_body, dict(row.response_headers or {}))


async def abandon(deps: Deps, owned: Claim) -> None:
    try:
        async with unit_of_work(deps.sessionmaker) as session:
            await idempotency_service.abandon(session, owned)
    except (SQLAlchemyError, OSError) as error:
        # The claim then lapses after `IN_FLIGHT_TIMEOUT` and a retry takes it over.
        log.warning("idempotency.abandon_failed", key=owned.key, error=repr(error))


async def store_final(
    deps: Deps, owned: Claim, *, status: int, body: str, headers: dict[str, str]
) -> None:
    """Replace the stored `202` with the answer actually sent after `Prefer: wait`."""
    try:
        async with unit_of_work(deps.sessionmaker) as session:
            await idempotency_service.complete(
                session, owned, status=status, body=body, headers=headers
            )
    except (SQLAlchemyError, OSError) as error:
        # The stored 202 still describes the same job; a replay stays correct.
        log.warning("idempotency.store_final_failed", key=owned.key, error=repr(error))
