"""A loopback TCP proxy a test controls, to make a server unreachable for one process only.

Stopping the real PostgreSQL server would break every other test on the machine; cutting
this proxy breaks only the processes pointed at it. Three states:

- `forward`: every byte passes.
- `refuse`: open links are aborted (RST, like a crashed server) and new ones are closed
  at once (a connection refused, as near as a listening socket gets).
- `blackhole`: nothing flows any more, on open links or on new ones (accepted, never
  answered), and nothing is reset: a network that drops packets. The client's own
  timeouts are all that end its wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

Mode = Literal["forward", "refuse", "blackhole"]


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # New links accepted while blackholed: never connected upstream.
        self._silent: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self.mode: Mode = "forward"
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def set(self, mode: Mode) -> None:
        """Switch state: `refuse` aborts every open link, `blackhole` stalls them."""
        self.mode = mode
        for writer in list(self._silent):
            writer.transport.abort()
        self._silent.clear()
        if mode == "blackhole":
            self._flowing.clear()
            return
        self._flowing.set()
        if mode == "refuse":
            for writer in list(self._links):
                writer.transport.abort()
            self._links.clear()

    async def aclose(self) -> None:
        self.set("refuse")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.transport.abort()
            return
        if self.mode == "blackhole":
            # Held open and silent; aborted when the mode changes or the proxy closes.
            self._silent.add(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await source.read(65536):
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        sink.transport.abort()
        self._links.discard(sink)
