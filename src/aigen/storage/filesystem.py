"""The local-folder store: assets on disk, read back through HMAC-signed, expiring URLs.

A URL is `{public_url}/v1/assets/{key}?expires=<unix seconds>&signature=<hex>`, where the
signature is HMAC-SHA256 over the key and the expiry under a key derived from the server
secret. The API serves it after `verify_signed_url` says yes; nothing else is needed, so
any API process that shares the secret (and the folder) can serve any asset.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlencode

from aigen.clock import utcnow

from .base import InvalidKeyError, StorageError, StorageUnavailableError, check_key

# Signing URLs with a key derived for this one purpose means a signature minted here can
# never be replayed as, say, an API-key hash made with the same server secret.
_URL_KEY_CONTEXT = b"aigen.storage.asset-url.v1"


def _url_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), _URL_KEY_CONTEXT, hashlib.sha256).digest()


def sign_asset_url(key: str, expires: int, *, secret: str) -> str:
    """The hex signature of `key` valid until `expires` (unix seconds)."""
    message = f"{key}\n{expires}".encode()
    return hmac.new(_url_key(secret), message, hashlib.sha256).hexdigest()


def verify_signed_url(
    key: str, expires: int, signature: str, *, secret: str, now: datetime | float
) -> bool:
    """True when `signature` was minted for `key` and `expires`, and `now` is before it.

    `key` is the decoded path after `/v1/assets/`; `now` is a datetime or unix seconds.
    The comparison runs in constant time.
    """
    now_seconds = now.timestamp() if isinstance(now, datetime) else now
    if now_seconds >= expires:
        return False
    expected = sign_asset_url(key, expires, secret=secret)
    try:
        given = signature.encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(expected.encode("ascii"), given)


class FilesystemStore:
    """Assets as files under `root`; the embedded default and the tests' store."""

    def __init__(self, root: Path, *, secret: str, public_url: str) -> None:
        # Resolved once, so a later chdir cannot move the store and the escape check
        # compares real paths.
        self.root = root.expanduser().resolve()
        self._secret = secret
        self._public_url = public_url.rstrip("/")

    def path_for(self, key: str) -> Path:
        """The file that holds `key`; raises `InvalidKeyError` if it would leave the root."""
        path = (self.root / check_key(key)).resolve()
        # `check_key` already refuses `..`; this also stops a symlink inside the root
        # from pointing the write somewhere else.
        if not path.is_relative_to(self.root):
            raise InvalidKeyError(f"storage key {key!r} leaves the store")
        return path

    async def start(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        # The content type is not kept: the assets table holds it, and keys end in an
        # extension that names it.
        check_key(key)
        try:
            # The folder and the temporary file are made here, in the loop's thread: a
            # few metadata calls on a local disk. Only the calls that wait for the disk
            # (or, for a large asset, copy it) go to a thread, with no Python between
            # them: a thread retakes the GIL after every call, and while the loop is
            # busy each retake waits for it. With the whole write in the thread (about
            # twenty calls), a worker at 64 slots spent about a third more CPU per job,
            # and its writes took half as long again or more (BENCHMARKS.md, the
            # fourteenth session).
            staged = _stage(self.path_for(key))
            await asyncio.to_thread(_commit, staged, data)
        except OSError as exc:
            raise StorageError(f"could not write {key!r}: {exc}") from exc

    async def get(self, key: str) -> bytes:
        check_key(key)
        try:
            return await asyncio.to_thread(lambda: self.path_for(key).read_bytes())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None
        except OSError as exc:
            raise StorageError(f"could not read {key!r}: {exc}") from exc

    async def url(self, key: str, *, expires_in: int) -> tuple[str, datetime]:
        check_key(key)
        if expires_in <= 0:
            raise ValueError("expires_in must be a positive number of seconds")
        expires = int(utcnow().timestamp()) + expires_in
        query = urlencode(
            {"expires": expires, "signature": sign_asset_url(key, expires, secret=self._secret)}
        )
        url = f"{self._public_url}/v1/assets/{quote(key, safe='/')}?{query}"
        return url, datetime.fromtimestamp(expires, UTC)

    async def ping(self) -> None:
        try:
            await asyncio.to_thread(_probe_writable, self.root)
        except OSError as exc:
            raise StorageUnavailableError(
                f"asset folder {self.root} is not writable: {exc}"
            ) from exc

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _Staged:
    """A write under way: the temporary file beside its target, open, and the folders
    whose entries must reach the disk with it, open where the platform allows: the
    target's own (the rename), then the parent of each folder made for it (the new
    folder's name). `_commit` closes them all."""

    path: Path
    temporary: str
    fd: int
    folder_fds: tuple[int, ...]


def _stage(path: Path) -> _Staged:
    missing = _make_folders(path.parent)
    # The temporary file sits in the target's folder so `os.replace` is a rename on one
    # file system: readers see the old bytes or the new, never a half-written file.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    folder_fds: list[int] = []
    for folder in (path.parent, *(new.parent for new in missing)):
        with contextlib.suppress(OSError):  # Not every platform lets a folder be opened.
            folder_fds.append(os.open(folder, os.O_RDONLY))
    return _Staged(path, temporary, fd, tuple(folder_fds))


def _make_folders(folder: Path) -> list[Path]:
    """Make `folder` and any missing parents; returns the folders that were missing.

    A job's assets go in a folder of their own, made by its first write: the asset's
    fsync makes its bytes durable, but the new folder's name is an entry in its parent,
    which a crash can lose on a file system that does not order its metadata (ext4's
    journal happens to commit it with the file; not every file system does).
    """
    missing: list[Path] = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        # Made first by a write beside this one: its name is synced here all the same,
        # as this write's job must not complete before it is durable.
        with contextlib.suppress(FileExistsError):
            new.mkdir()
    return missing


def _commit(staged: _Staged, data: bytes) -> None:
    """Write, flush to disk, rename into place, and make the rename and any new folders
    durable."""
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(staged.fd, view) :]
            # The job is marked completed right after this returns, so the bytes must
            # survive a crash that follows.
            os.fsync(staged.fd)
        finally:
            os.close(staged.fd)
        os.replace(staged.temporary, staged.path)
        for folder_fd in staged.folder_fds:
            with contextlib.suppress(OSError):  # Not every file system syncs a folder.
                os.fsync(folder_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staged.temporary)
        raise
    finally:
        for folder_fd in staged.folder_fds:
            os.close(folder_fd)


def _probe_writable(root: Path) -> None:
    # Writing a byte is the honest test: `os.access` misses some reasons a write fails
    # (quotas, a full disk, some network file systems).
    with tempfile.TemporaryFile(dir=root) as probe:
        probe.write(b"\0")
        probe.flush()
