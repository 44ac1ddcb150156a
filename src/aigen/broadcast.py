"""Notices every API process must hear at once, with no need to keep them: key revocations.

A verified key is cached for at most `key_cache_seconds` (DESIGN §6), which bounds how
late a revocation can be seen; with Redis, `aigen keys revoke` also publishes the key id
and every API process drops it from its cache as soon as the message arrives. A listener
that loses its connection forgets its whole cache when it is back (`on_notice(None)`),
since it may have missed a notice meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from aigen.aio import sleep_or_stop

log = structlog.get_logger(__name__)

# Called with a revoked key's id, or None for "forget every key".
OnNotice = Callable[[str | None], None]


class Revocations(Protocol):
    async def publish(self, key_id: str) -> None:
        """Tell every listening process that `key_id` was revoked (after the commit)."""
        ...

    async def listen(self, on_notice: OnNotice, stop: asyncio.Event) -> None:
        """Call `on_notice` for every revocation until `stop` is set."""
        ...

    async def aclose(self) -> None: ...


class LocalRevocations:
    """Within one process only (no Redis): other processes rely on the cache time."""

    def __init__(self) -> None:
        self._listeners: list[OnNotice] = []

    async def publish(self, key_id: str) -> None:
        for listener in list(self._listeners):
            listener(key_id)

    async def listen(self, on_notice: OnNotice, stop: asyncio.Event) -> None:
        self._listeners.append(on_notice)
        try:
            await stop.wait()
        finally:
            self._listeners.remove(on_notice)

    async def aclose(self) -> None:
        return None


class RedisRevocations:
    """Redis pub/sub on `{prefix}keys:revoked`: at most once, which the cache time backs."""

    def __init__(self, client: Redis, *, prefix: str = "aigen:") -> None:
        self._client = client
        self.channel = f"{prefix}keys:revoked"

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "aigen:") -> RedisRevocations:
        client = Redis.from_url(url, decode_responses=True, socket_connect_timeout=2.0)
        return cls(client, prefix=prefix)

    async def publish(self, key_id: str) -> None:
        try:
            await self._client.publish(self.channel, key_id)
        except RedisError as error:
            # The revocation is committed; caches still drop the key within their time.
            log.warning("revocation.publish_failed", key_id=key_id, error=repr(error))

    async def listen(self, on_notice: OnNotice, stop: asyncio.Event) -> None:
        while not stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                on_notice(None)
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=0.5)
                    if message is not None and isinstance(message.get("data"), str):
                        on_notice(message["data"])
            except (RedisError, OSError) as error:
                log.warning("revocation.listen_failed", error=repr(error))
                await sleep_or_stop(stop, 1.0)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        await self._client.aclose()
