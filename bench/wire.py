"""A minimal HTTP/1.1 client and webhook receiver on asyncio streams, for loopback only.

Both are far cheaper per request than a general-purpose client or framework, so that on a
2-core machine the load generator and the receiver take as little CPU as possible from
the processes being measured. They speak just enough HTTP/1.1 for aigen and the notifier:
keep-alive, `Content-Length` bodies, no chunking on the request side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

# Kept-alive connections idle longer than this are not reused (uvicorn closes at 5 s).
IDLE_SECONDS = 3.0


@dataclass
class Answer:
    status: int
    body: bytes


class Client:
    """Keep-alive connections to one `http://127.0.0.1:port`, at most `limit` at once."""

    def __init__(self, url: str, *, limit: int = 256) -> None:
        host, port = url.removeprefix("http://").split(":")
        self._host = host
        self._port = int(port)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self._slots = asyncio.Semaphore(limit)
        self._open: set[asyncio.StreamWriter] = set()

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        async with self._slots:
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            request = (
                f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\n{head}"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            while self._idle:
                # A kept-alive connection the server has closed meanwhile (uvicorn drops
                # idle ones after 5 s) fails before any answer: try the next one.
                reader, writer, since = self._idle.pop()
                if time.monotonic() - since > IDLE_SECONDS:
                    self._drop(writer)
                    continue
                try:
                    return await self._exchange(reader, writer, request)
                except (asyncio.IncompleteReadError, ConnectionError):
                    continue
            reader, writer = await asyncio.open_connection(self._host, self._port)
            self._open.add(writer)
            return await self._exchange(reader, writer, request)

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
    ) -> Answer:
        writer.write(request)
        try:
            answer, keep = await _read_response(reader)
        except BaseException:
            self._drop(writer)
            raise
        if keep:
            self._idle.append((reader, writer, time.monotonic()))
        else:
            self._drop(writer)
        return answer

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        self._open.discard(writer)
        writer.close()

    async def aclose(self) -> None:
        for writer in self._open:
            writer.close()
        self._open.clear()
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader) -> tuple[Answer, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    keep = True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            keep = False
    body = await reader.readexactly(length) if length else b""
    return Answer(status, body), keep


@dataclass
class Receiver:
    """A webhook receiver on loopback: answers 200 to any request and records, for each
    job, when its first webhook arrived (`time.perf_counter()`, body fully read)."""

    arrived: dict[str, float] = field(default_factory=dict)
    port: int = 0
    _server: asyncio.Server | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                now = time.perf_counter()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self.arrived.setdefault(json.loads(body)["data"]["id"], now)
                self._changed.set()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def changed(self, timeout: float) -> None:
        """Until a webhook arrives, or `timeout`."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def wait_for(self, job_ids: set[str] | list[str], timeout: float) -> bool:
        """Until every job in `job_ids` has had its webhook, or `timeout`; True if all did."""
        deadline = time.monotonic() + timeout
        wanted = set(job_ids)
        while not wanted <= self.arrived.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self.changed(min(left, 0.5))
        return True
