from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from aigen.clock import utcnow
from aigen.storage import FilesystemStore, InvalidKeyError, StorageError, StorageUnavailableError
from aigen.storage.filesystem import verify_signed_url

from .conftest import split_url

SECRET = "s" * 48
KEY = "assets/acc_1/job_1/0.png"
BAD_KEYS = ["", "../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/", "a\\..\\b", "a\x00b"]


@pytest.fixture
async def store(tmp_path: Path) -> FilesystemStore:
    store = FilesystemStore(tmp_path / "assets", secret=SECRET, public_url="http://api.test/")
    await store.start()
    return store


class TestPut:
    async def test_round_trip(self, store: FilesystemStore) -> None:
        await store.put(KEY, b"\x89PNG", content_type="image/png")

        assert await store.get(KEY) == b"\x89PNG"
        assert (store.root / KEY).read_bytes() == b"\x89PNG"

    async def test_overwrite(self, store: FilesystemStore) -> None:
        await store.put(KEY, b"first", content_type="text/plain")
        await store.put(KEY, b"second", content_type="text/plain")

        assert await store.get(KEY) == b"second"
        assert os.listdir(store.root / "assets/acc_1/job_1") == ["0.png"]

    async def test_failed_write_keeps_old_bytes(
        self, store: FilesystemStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        await store.put(KEY, b"old", content_type="text/plain")

        def broken_fsync(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", broken_fsync)
        with pytest.raises(StorageError):
            await store.put(KEY, b"new", content_type="text/plain")

        assert await store.get(KEY) == b"old"
        assert os.listdir(store.root / "assets/acc_1/job_1") == ["0.png"]

    async def test_large_asset(self, store: FilesystemStore) -> None:
        data = os.urandom(5 * 1024 * 1024 + 3)

        await store.put(KEY, data, content_type="image/png")

        assert await store.get(KEY) == data

    @pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
    async def test_leaves_no_file_open(
        self, store: FilesystemStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A worker writes an asset per job for as long as it runs.
        await store.put(KEY, b"warm", content_type="text/plain")
        before = len(os.listdir("/proc/self/fd"))

        for n in range(20):
            await store.put(f"assets/acc_1/job_{n}/0.txt", b"x", content_type="text/plain")

        def broken_fsync(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", broken_fsync)
        for _ in range(5):
            with pytest.raises(StorageError):
                await store.put(KEY, b"new", content_type="text/plain")

        assert len(os.listdir("/proc/self/fd")) == before
        assert await store.get(KEY) == b"warm"

    @pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
    async def test_new_folders_reach_the_disk(
        self, store: FilesystemStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A crash after the job is marked completed must not lose the folder that the
        # asset's name lives in: each folder made for it is synced in its parent.
        synced: list[str] = []
        fsync = os.fsync

        def recording_fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            fsync(fd)

        monkeypatch.setattr(os, "fsync", recording_fsync)
        await store.put(KEY, b"first", content_type="text/plain")
        first, synced[:] = list(synced), []
        await store.put("assets/acc_1/job_2/0.png", b"second", content_type="text/plain")
        second, synced[:] = list(synced), []
        await store.put("assets/acc_1/job_2/1.png", b"third", content_type="text/plain")

        root = str(store.root)
        # The asset (still under its temporary name), its folder (the rename), then the
        # parents of job_1, acc_1 and assets, all three made by the first write.
        assert os.path.dirname(first[0]) == f"{root}/assets/acc_1/job_1"
        assert set(first[1:]) == {
            f"{root}/assets/acc_1/job_1",
            f"{root}/assets/acc_1",
            f"{root}/assets",
            root,
        }
        assert set(second[1:]) == {f"{root}/assets/acc_1/job_2", f"{root}/assets/acc_1"}
        assert synced[1:] == [f"{root}/assets/acc_1/job_2"]

    @pytest.mark.parametrize("key", BAD_KEYS)
    async def test_refuses_escaping_keys(self, store: FilesystemStore, key: str) -> None:
        with pytest.raises(InvalidKeyError):
            await store.put(key, b"x", content_type="text/plain")

        assert not (store.root.parent / "x").exists()

    async def test_refuses_symlink_out_of_root(
        self, store: FilesystemStore, tmp_path: Path
    ) -> None:
        outside = tmp_path / "outside"
        outside.mkdir()
        (store.root / "link").symlink_to(outside)

        with pytest.raises(InvalidKeyError):
            await store.put("link/x.txt", b"x", content_type="text/plain")

        assert list(outside.iterdir()) == []


class TestGet:
    async def test_missing(self, store: FilesystemStore) -> None:
        with pytest.raises(KeyError):
            await store.get(KEY)

    async def test_folder_is_not_an_asset(self, store: FilesystemStore) -> None:
        await store.put(KEY, b"x", content_type="text/plain")

        with pytest.raises(KeyError):
            await store.get("assets/acc_1")

    @pytest.mark.parametrize("key", BAD_KEYS)
    async def test_refuses_escaping_keys(self, store: FilesystemStore, key: str) -> None:
        with pytest.raises(InvalidKeyError):
            await store.get(key)


class TestUrl:
    async def test_signed_url_verifies(self, store: FilesystemStore) -> None:
        before = utcnow()
        url, expires_at = await store.url(KEY, expires_in=3600)

        assert url.startswith(f"http://api.test/v1/assets/{KEY}?expires=")
        key, expires, signature = split_url(url)
        assert key == KEY
        assert expires == int(expires_at.timestamp())
        assert before + timedelta(seconds=3599) <= expires_at <= utcnow() + timedelta(seconds=3600)
        assert verify_signed_url(key, expires, signature, secret=SECRET, now=utcnow())

    async def test_unix_seconds(self, store: FilesystemStore) -> None:
        url, _ = await store.url(KEY, expires_in=60)
        key, expires, signature = split_url(url)

        assert verify_signed_url(key, expires, signature, secret=SECRET, now=time.time())
        assert not verify_signed_url(key, expires, signature, secret=SECRET, now=expires)

    async def test_expired(self, store: FilesystemStore) -> None:
        url, expires_at = await store.url(KEY, expires_in=60)
        key, expires, signature = split_url(url)

        assert not verify_signed_url(key, expires, signature, secret=SECRET, now=expires_at)
        assert not verify_signed_url(
            key, expires, signature, secret=SECRET, now=expires_at + timedelta(days=1)
        )

    async def test_tampered(self, store: FilesystemStore) -> None:
        url, _ = await store.url(KEY, expires_in=60)
        key, expires, signature = split_url(url)
        now = utcnow()
        flipped = ("0" if signature[0] != "0" else "1") + signature[1:]

        assert not verify_signed_url(key, expires, flipped, secret=SECRET, now=now)
        assert not verify_signed_url(key, expires, "", secret=SECRET, now=now)
        assert not verify_signed_url(key, expires, "é" * 64, secret=SECRET, now=now)
        assert not verify_signed_url(key, expires + 3600, signature, secret=SECRET, now=now)
        assert not verify_signed_url(
            "assets/acc_2/job_1/0.png", expires, signature, secret=SECRET, now=now
        )
        assert not verify_signed_url(key, expires, signature, secret="other" * 10, now=now)

    async def test_quotes_the_key(self, store: FilesystemStore) -> None:
        url, _ = await store.url("assets/a b/0.txt", expires_in=60)

        assert "/v1/assets/assets/a%20b/0.txt?" in url
        key, expires, signature = split_url(url)
        assert verify_signed_url(key, expires, signature, secret=SECRET, now=utcnow())

    async def test_refuses_bad_ttl_and_keys(self, store: FilesystemStore) -> None:
        with pytest.raises(ValueError, match="expires_in"):
            await store.url(KEY, expires_in=0)
        with pytest.raises(InvalidKeyError):
            await store.url("../x", expires_in=60)


class TestPing:
    async def test_writable(self, store: FilesystemStore) -> None:
        await store.ping()

        assert os.listdir(store.root) == []

    async def test_missing_folder(self, tmp_path: Path) -> None:
        store = FilesystemStore(tmp_path / "nowhere", secret=SECRET, public_url="http://x")

        with pytest.raises(StorageUnavailableError):
            await store.ping()

    async def test_root_is_a_file(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_bytes(b"")
        store = FilesystemStore(tmp_path / "file", secret=SECRET, public_url="http://x")

        with pytest.raises(StorageUnavailableError):
            await store.ping()
