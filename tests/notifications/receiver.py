"""`WebhookReceiverDouble`: a real HTTP server on 127.0.0.1 whose answers a test scripts.

Each path has a queue of `Answer`s (status, headers, body, a delay before answering);
when a path's queue is empty the default answer (200) is given. Every request is kept,
in order, with the time it arrived. Pass an `ssl.SSLContext` to serve HTTPS; the TLS
server names (SNI) the clients asked for are kept in `sni_names`. It answers one request
per connection, unless `keep_alive_seconds` is given: then a connection is kept for more,
and closed after that long idle, without notice, as servers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import h11
from standardwebhooks.webhooks import Webhook


@dataclass(frozen=True)
class Answer:
    """One scripted answer; `delay` seconds pass before it is sent."""

    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when the request had arrived whole

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    def verify(self, secret: str) -> Any:
        """The payload, verified with standardwebhooks' own `Webhook(secret).verify`."""
        return Webhook(secret).verify(self.body, self.headers)


class WebhookReceiverDouble:
    """A scriptable webhook receiver on a free loopback port."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keep_alive_seconds: float | None = None,
    ) -> None:
        self.requests: list[ReceivedRequest] = []
        self.connections = 0  # connections accepted
        self._keep_alive = keep_alive_seconds
        self.sni_names: list[str | None] = []
        self.max_in_flight = 0  # most requests held open at once (arrived, not yet answered)
        self._in_flight = 0
        self.default = Answer()
        self._answers: defaultdict[str, deque[Answer]] = defaultdict(deque)
        self._ssl = ssl_context
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Condition()
        if ssl_context is not None:
            ssl_context.sni_callback = self._on_sni

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(
            self._handle, host="127.0.0.1", port=0, ssl=self._ssl
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, path: str = "/hook", *, host: str = "127.0.0.1") -> str:
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def script(self, path: str, *answers: Answer) -> None:
        """Queue `answers` for the next requests to `path`, in order."""
        self._answers[path].extend(answers)

    def received(self, path: str | None = None) -> list[ReceivedRequest]:
        return [r for r in self.requests if path is None or r.path == path]

    async def wait_for(self, count: int, *, path: str | None = None, within: float = 10.0) -> None:
        """Wait until `count` requests (to `path`, if given) have arrived."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.received(path)) >= count)

    def _on_sni(self, _sock: Any, name: str | None, _context: ssl.SSLContext) -> None:
        self.sni_names.append(name)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            conn = h11.Connection(h11.SERVER)
            await self._serve_one(conn, reader, writer)
            while self._keep_alive is not None and conn.our_state is h11.DONE:
                conn.start_next_cycle()
                try:
                    async with asyncio.timeout(self._keep_alive):
                        data = await reader.read(65536)
                except TimeoutError:
                    return  # idle too long: closed without a word
                if not data:
                    return
                conn.receive_data(data)
                await self._serve_one(conn, reader, writer)
        except (ConnectionError, ssl.SSLError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass  # the client went away (timeout, or it read all it wanted)
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_one(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if request is None:
            return
        path = request.target.decode()
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        async with self._arrived:
            self.requests.append(
                ReceivedRequest(
                    request.method.decode(), path, headers, bytes(body), time.monotonic()
                )
            )
            self._arrived.notify_all()
        queue = self._answers[path]
        answer = queue.popleft() if queue else self.default
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if answer.delay:
                await asyncio.sleep(answer.delay)
        finally:
            self._in_flight -= 1
        response_headers = [
            *answer.headers.items(),
            ("content-length", str(len(answer.body))),
            *([("connection", "close")] if self._keep_alive is None else []),
        ]
        writer.write(conn.send(h11.Response(status_code=answer.status, headers=response_headers)))
        writer.write(conn.send(h11.Data(data=answer.body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
