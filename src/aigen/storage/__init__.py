"""Asset storage (DESIGN §8): the `AssetStore` port, its local-folder and S3 adapters.

`create_store` reads `AIGEN_STORAGE_URL`:

- `file://./data/assets`, `file:///srv/aigen/assets`: a folder, relative to the working
  directory or absolute; URLs are signed by the server secret and served by the API.
- `s3://[KEY_ID:SECRET@]bucket[/prefix][?endpoint_url=…&region=…&addressing_style=path
  &public_endpoint_url=…]`: any S3-compatible server. Without credentials in the URL the
  standard AWS variables and profiles are used. Percent-encode a secret's `/` and `+`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from aigen.config import Settings

from .base import (
    AssetStore,
    InvalidKeyError,
    StorageError,
    StorageUnavailableError,
    asset_key,
    check_key,
)
from .filesystem import FilesystemStore, sign_asset_url, verify_signed_url

if TYPE_CHECKING:
    from .s3 import AddressingStyle, S3Store

__all__ = [
    "AssetStore",
    "FilesystemStore",
    "InvalidKeyError",
    "S3Store",
    "StorageError",
    "StorageUnavailableError",
    "asset_key",
    "check_key",
    "create_store",
    "sign_asset_url",
    "verify_signed_url",
]


def __getattr__(name: str) -> Any:
    # The S3 adapter (aioboto3, a third of a second to import) loads only when used.
    if name == "S3Store":
        from .s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_S3_OPTIONS = frozenset({"endpoint_url", "public_endpoint_url", "region", "addressing_style"})
_ADDRESSING_STYLES: dict[str, AddressingStyle] = {
    "auto": "auto",
    "path": "path",
    "virtual": "virtual",
}


def create_store(settings: Settings) -> AssetStore:
    """The store `settings.storage_url` names; call `start()` on it before use."""
    url = settings.storage_url
    scheme = url.partition("://")[0].lower()
    if scheme == "file":
        return FilesystemStore(
            _file_path(url), secret=settings.resolved_secret(), public_url=settings.public_url
        )
    if scheme == "s3":
        return _s3_store(url)
    raise ValueError(f"AIGEN_STORAGE_URL must start with file:// or s3://, not {url!r}")


def _file_path(url: str) -> Path:
    # Parsed by hand: `urlsplit("file://./data")` takes `.` for a host name.
    rest = unquote(url[len("file://") :])
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    if not rest:
        raise ValueError("a file:// storage URL needs a folder")
    return Path(rest)


def _s3_store(url: str) -> S3Store:
    parts = urlsplit(url)
    userinfo, _, bucket = parts.netloc.rpartition("@")
    if not bucket or ":" in bucket:
        raise ValueError(f"an s3:// storage URL needs a bucket and no port: {url!r}")
    access_key_id = secret_access_key = None
    if userinfo:
        key_id, _, secret = userinfo.partition(":")
        if not key_id or not secret:
            raise ValueError("s3:// storage URL credentials must be KEY_ID:SECRET")
        access_key_id, secret_access_key = unquote(key_id), unquote(secret)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    # A mistyped option would otherwise be ignored and the store silently talk to AWS.
    unknown = options.keys() - _S3_OPTIONS
    if unknown:
        raise ValueError(f"unknown s3:// storage URL options: {', '.join(sorted(unknown))}")
    from .s3 import S3Store

    raw_style = options.get("addressing_style") or None
    style = _ADDRESSING_STYLES.get(raw_style) if raw_style else None
    if raw_style and style is None:
        raise ValueError(f"addressing_style must be auto, path or virtual, not {raw_style!r}")
    return S3Store(
        bucket,
        prefix=unquote(parts.path),
        endpoint_url=options.get("endpoint_url") or None,
        public_endpoint_url=options.get("public_endpoint_url") or None,
        region=options.get("region") or None,
        addressing_style=style,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
    )
