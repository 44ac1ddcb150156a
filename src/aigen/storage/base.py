"""The object-storage port (DESIGN §8): put an asset under a key, mint a URL to read it.

Errors, translated from each backend at the store's edge::

    KeyError                       `get` of a key that holds nothing
    StorageError                   the store failed; worth retrying later
    ├── StorageUnavailableError    the store cannot be reached (readiness fails)
    └── InvalidKeyError            the key is not a safe relative path (also a ValueError)
"""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath
from typing import Protocol


class StorageError(Exception):
    """The store failed to do what was asked."""


class StorageUnavailableError(StorageError):
    """The store cannot be reached or refuses every request."""


class InvalidKeyError(StorageError, ValueError):
    """The key is empty, absolute, or walks out of the store (`..`)."""


def asset_key(account_id: str, job_id: str, index: int, ext: str) -> str:
    """`assets/{account}/{job}/{index}.{ext}`: a retried job overwrites, never orphans."""
    return f"assets/{account_id}/{job_id}/{index}.{ext}"


def check_key(key: str) -> str:
    """Return `key` when it is a plain relative path, else raise `InvalidKeyError`.

    Every store refuses the same keys, so a key that works on S3 also works on disk.
    """
    # Backslashes and NULs are refused outright: on some systems they are separators or
    # terminators, and no key we mint contains them.
    if not key or "\\" in key or "\x00" in key:
        raise InvalidKeyError(f"invalid storage key {key!r}")
    path = PurePosixPath(key)
    if path.is_absolute() or str(path) != key or any(part in (".", "..") for part in path.parts):
        # `str(path) != key` also catches `a//b`, `a/./b` and a trailing slash, which
        # would name the same file under two keys on disk but two objects on S3.
        raise InvalidKeyError(f"invalid storage key {key!r}")
    return key


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
        """Raise `StorageUnavailableError` when the store cannot be reached (readiness)."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store is not used again."""
        ...
