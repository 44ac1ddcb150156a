"""One HTTP attempt of a webhook: guard the URL, POST to the checked address, read the answer.

Every attempt passes the SSRF guard again (an endpoint's DNS may have changed since the
last one), redirects are never followed, and the whole attempt — resolving, connecting,
sending, reading — has one deadline. Only the first 20 KB of the answer are read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from aigen.config import Settings

from .ssrf import Resolver, UnsafeURLError, pinned_request, validate_url

MAX_RESPONSE_BYTES = 20 * 1024
MAX_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt came to; `error` says why it failed when there is no status to say it."""

    status_code: int | None = None
    latency_ms: int = 0
    response_body: str | None = None
    error: str | None = None
    retry_after: str | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def default_http_client(settings: Settings) -> httpx.AsyncClient:
    """The client attempts use unless the dispatcher is given another.

    No keep-alive: the pool is keyed by IP address, and a kept connection could carry a
    request for one host name over a TLS session made for another. No environment
    proxies: a proxy would resolve the name again, behind the guard's back.
    """
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(settings.webhook_timeout_seconds),
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"user-agent": "aigen-webhooks", "accept-encoding": "identity"},
    )


async def post(
    client: httpx.AsyncClient,
    url: str,
    *,
    settings: Settings,
    headers: Mapping[str, str],
    body: bytes,
    https_only: bool = False,
    resolver: Resolver | None = None,
) -> AttemptResult:
    """POST `body` to `url` through the SSRF guard; never raises for network failures."""
    timeout = settings.webhook_timeout_seconds
    started = time.monotonic()
    status_code: int | None = None
    retry_after: str | None = None
    received = bytearray()
    error: str | None = None
    timed_out = False
    try:
        async with asyncio.timeout(timeout):
            checked = await validate_url(url, settings, https_only=https_only, resolver=resolver)
            started = time.monotonic()
            request = pinned_request(client, checked, headers=headers, content=body)
            response = await client.send(request, stream=True, follow_redirects=False)
            try:
                status_code = response.status_code
                retry_after = response.headers.get("retry-after")
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    error = f"redirects are not followed (Location: {location})"
                # Raw bytes, never decompressed: a small gzip body could inflate without end.
                async for chunk in response.aiter_raw():
                    received += chunk
                    if len(received) >= MAX_RESPONSE_BYTES:
                        break
            finally:
                await response.aclose()
    except UnsafeURLError as exc:
        error = f"refused by the SSRF guard: {exc}"
    except (TimeoutError, httpx.TimeoutException):
        timed_out = True
        error = f"timed out after {timeout:g} s"
    except (httpx.HTTPError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return AttemptResult(
        status_code=status_code,
        latency_ms=round((time.monotonic() - started) * 1000),
        response_body=_text(bytes(received[:MAX_RESPONSE_BYTES])) if status_code else None,
        error=error[:MAX_ERROR_CHARS] if error else None,
        retry_after=retry_after,
        timed_out=timed_out,
    )


def _text(data: bytes) -> str:
    # PostgreSQL text cannot hold NUL; a cut may split a character: both become U+FFFD.
    return data.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
