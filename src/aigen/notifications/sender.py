"""One HTTP attempt of a webhook: guard the URL, POST to the checked address, read the answer.

Every attempt passes the SSRF guard again (an endpoint's DNS may have changed since the
last one), redirects are never followed, and the whole attempt — resolving, connecting,
sending, reading — has one deadline. Only the first 20 KB of the answer are read.

The attempts go through aiohttp, not httpx: measured alone, a loopback POST cost 0.17–0.19
ms of CPU through aiohttp and 1.3–1.6 ms through httpx's transport (BENCHMARKS.md, the
tenth session), where httpx had been about a quarter of the notifier's CPU at the
pipeline's maximum. The client's errors are mapped at this edge to the names the attempt
log shows (`_ERRORS`):

    aiohttp.ClientError
     ├── ClientConnectorError (DNS, refused, TLS, certificate)  → ConnectError
     ├── ServerDisconnectedError, ClientResponseError (bad HTTP) → RemoteProtocolError
     ├── ClientPayloadError, ClientOSError (mid-exchange)        → ReadError
     └── any other                                               → HTTPError
    TimeoutError (aiohttp's own timeouts included)               → timed out
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from aigen.config import Settings

from .ssrf import Resolver, UnsafeURLError, pinned_request, validate_url

MAX_RESPONSE_BYTES = 20 * 1024
MAX_ERROR_CHARS = 500
# An idle kept connection is dropped after this long: sooner than the usual servers end
# theirs (uvicorn, Node.js: 5 s), so that one is rarely reused just as the server closes it.
KEEPALIVE_SECONDS = 4.0


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


def default_http_client(
    settings: Settings, *, verify: ssl.SSLContext | None = None
) -> aiohttp.ClientSession:
    """The session the attempts to one origin use, unless the dispatcher is given another.

    Connections are kept alive: a TLS handshake (or a TCP one) per webhook costs both
    sides more than the webhook. Only within one origin (`Clients`), since the pool is
    keyed by the checked IP address. No environment proxies: a proxy would resolve the
    name again, behind the guard's back. Bodies are read as sent, never decompressed.
    `verify`: the TLS context to check certificates with (the system's by default).
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            keepalive_timeout=KEEPALIVE_SECONDS, ssl=verify if verify is not None else True
        ),
        timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_seconds),
        trust_env=False,
        auto_decompress=False,
        headers={"user-agent": "aigen-webhooks", "accept-encoding": "identity"},
    )


Origin = tuple[str, str, int | None]  # scheme, host name, port


class Clients:
    """One HTTP client per webhook origin (scheme, host name, port), made by `factory`.

    Every request is pinned to the address the guard checked (`pinned_request`), so a
    client's pool is keyed by IP address: were two host names on one address to share a
    client, a connection kept for one, with its TLS session, could carry a request for
    the other. With a client per host name, a kept connection only ever serves the name
    it was opened (and its certificate checked) for, and only while the name resolves to
    the address it was opened to. The `max_clients` most recently used are kept; one
    pushed out is closed once the attempts that may still use it have ended.
    """

    def __init__(
        self,
        factory: Callable[[], aiohttp.ClientSession],
        *,
        max_clients: int = 256,
        linger_seconds: float = 60.0,
    ) -> None:
        self._factory = factory
        self._max = max_clients
        self._linger = linger_seconds
        self._clients: OrderedDict[Origin, aiohttp.ClientSession] = OrderedDict()
        self._retired: dict[asyncio.Task[None], aiohttp.ClientSession] = {}

    def for_url(self, url: str) -> aiohttp.ClientSession:
        origin = _origin(url)
        client = self._clients.get(origin)
        if client is not None:
            self._clients.move_to_end(origin)
            return client
        client = self._clients[origin] = self._factory()
        if len(self._clients) > self._max:
            _, oldest = self._clients.popitem(last=False)
            task = asyncio.get_running_loop().create_task(self._close_later(oldest))
            self._retired[task] = oldest
            task.add_done_callback(lambda done: self._retired.pop(done, None))
        return client

    async def _close_later(self, client: aiohttp.ClientSession) -> None:
        # An attempt that took it just before has a deadline; after that it is unused.
        await asyncio.sleep(self._linger)
        await client.close()

    async def aclose(self) -> None:
        """Close every client (a later `for_url` makes new ones)."""
        clients = [*self._clients.values(), *self._retired.values()]
        self._clients.clear()
        for task in list(self._retired):
            task.cancel()
        await asyncio.gather(*self._retired, return_exceptions=True)
        await asyncio.gather(*(client.close() for client in clients))


def _origin(url: str) -> Origin:
    # Never raises: a URL that does not parse is its own origin, and the guard refuses it.
    try:
        parts = urlsplit(url)
        return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", url, None


async def post(
    client: aiohttp.ClientSession,
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
            async with pinned_request(client, checked, headers=headers, content=body) as response:
                status_code = response.status
                retry_after = response.headers.get("retry-after")
                if response.status in _REDIRECTS and "location" in response.headers:
                    location = response.headers.get("location", "")
                    error = f"redirects are not followed (Location: {location})"
                # Raw bytes, never decompressed: a small gzip body could inflate without end.
                # An answer not read to its end closes its connection rather than keep it.
                async for chunk in response.content.iter_any():
                    received += chunk
                    if len(received) >= MAX_RESPONSE_BYTES:
                        break
    except UnsafeURLError as exc:
        error = f"refused by the SSRF guard: {exc}"
    except TimeoutError:
        timed_out = True
        error = f"timed out after {timeout:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        error = _described(exc)
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


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# The attempt log's name for each of aiohttp's errors: the first class that matches.
_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (aiohttp.ClientConnectorError, "ConnectError"),
    (aiohttp.ServerDisconnectedError, "RemoteProtocolError"),
    (aiohttp.ClientResponseError, "RemoteProtocolError"),
    (aiohttp.ClientPayloadError, "ReadError"),
    (aiohttp.ClientOSError, "ReadError"),
    (aiohttp.ClientError, "HTTPError"),
)


def _described(exc: BaseException) -> str:
    """`Name: message`, with the name the attempt log uses for the error's kind."""
    name = next((name for kind, name in _ERRORS if isinstance(exc, kind)), type(exc).__name__)
    return f"{name}: {exc}" if str(exc) else name
