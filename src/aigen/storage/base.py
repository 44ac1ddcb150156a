"""The object-storage port (DESIGN §8): put an asset under a key, mint a URL to read it."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol


def asset_key(account_id: str, job_id: str, index: int, ext: str) -> str:
    """`assets/{account}/{job}/{index}.{ext}`: a retried job overwrites, never orphans."""
    return f"assets/{account_id}/{job_id}/{index}.{ext}"


class AssetStore(Protocol):
    async def start(self) -> None:
        """Prepare the store (create the folder or bucket when absent)."""
        ...

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        """Write `data` under `key`, replacing what was there."""
        ...

    async def get(self, key: str) -> bytes:
        """Read an asset back; raises `KeyError` when there is none."""
        ...

    async def url(self, key: str, *, expires_in: int) -> tuple[str, datetime]:
        """A URL that reads the asset until the returned time."""
        ...

    async def ping(self) -> None:
        """Raise when the store cannot be reached (readiness)."""
        ...

    async def aclose(self) -> None: ...
