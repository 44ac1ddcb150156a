from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from aigen.clock import utcnow
from aigen.storage import (
    InvalidKeyError,
    S3Store,
    StorageError,
    StorageUnavailableError,
    create_store,
)
from tests.conftest import make_settings

from .conftest import endpoint_of, start_moto, stop_moto

pytestmark = pytest.mark.usefixtures("aws_env")

KEY = "assets/acc_1/job_1/0.txt"


def new_bucket() -> str:
    return f"aigen-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(moto_endpoint: str) -> AsyncIterator[S3Store]:
    store = S3Store(new_bucket(), endpoint_url=moto_endpoint, region="us-east-1")
    await store.start()
    yield store
    await store.aclose()


class TestStart:
    async def test_creates_the_bucket(self, moto_endpoint: str) -> None:
        bucket = new_bucket()
        probe = S3Store(bucket, endpoint_url=moto_endpoint, create_bucket=False, max_attempts=1)
        await probe.start()
        with pytest.raises(StorageUnavailableError):
            await probe.ping()

        store = S3Store(bucket, endpoint_url=moto_endpoint)
        await store.start()
        await probe.ping()
        await store.aclose()
        await probe.aclose()

    async def test_existing_bucket_is_kept(self, store: S3Store, moto_endpoint: str) -> None:
        await store.put(KEY, b"kept", content_type="text/plain")
        again = S3Store(store.bucket, endpoint_url=moto_endpoint)

        await again.start()

        assert await again.get(KEY) == b"kept"
        await again.aclose()

    async def test_other_region(self, moto_endpoint: str) -> None:
        store = S3Store(new_bucket(), endpoint_url=moto_endpoint, region="eu-west-1")

        await store.start()
        await store.put(KEY, b"x", content_type="text/plain")

        assert await store.get(KEY) == b"x"
        await store.aclose()

    async def test_no_credentials(
        self, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        store = S3Store(new_bucket(), endpoint_url=moto_endpoint)

        with pytest.raises(StorageError):
            await store.start()


class TestPutGet:
    async def test_round_trip(self, store: S3Store) -> None:
        await store.put(KEY, b"hello", content_type="text/plain")

        assert await store.get(KEY) == b"hello"

    async def test_overwrite(self, store: S3Store) -> None:
        await store.put(KEY, b"first", content_type="text/plain")
        await store.put(KEY, b"second", content_type="text/plain")

        assert await store.get(KEY) == b"second"

    async def test_missing(self, store: S3Store) -> None:
        with pytest.raises(KeyError):
            await store.get(KEY)

    async def test_refuses_bad_keys(self, store: S3Store) -> None:
        with pytest.raises(InvalidKeyError):
            await store.put("../x", b"x", content_type="text/plain")
        with pytest.raises(InvalidKeyError):
            await store.get("/x")

    async def test_prefix(self, store: S3Store, moto_endpoint: str) -> None:
        prefixed = S3Store(store.bucket, prefix="/tenant/a/", endpoint_url=moto_endpoint)
        await prefixed.start()

        await prefixed.put(KEY, b"inside", content_type="text/plain")

        assert prefixed.object_key(KEY) == f"tenant/a/{KEY}"
        assert await store.get(f"tenant/a/{KEY}") == b"inside"
        assert await prefixed.get(KEY) == b"inside"
        await prefixed.aclose()

    async def test_before_start(self, moto_endpoint: str) -> None:
        store = S3Store(new_bucket(), endpoint_url=moto_endpoint)

        with pytest.raises(RuntimeError):
            await store.put(KEY, b"x", content_type="text/plain")
        with pytest.raises(RuntimeError):
            await store.url(KEY, expires_in=60)


class TestUrl:
    async def test_presigned_url_downloads(self, store: S3Store) -> None:
        data = bytes(range(256)) * 40
        await store.put(KEY, data, content_type="application/octet-stream")
        before = utcnow()

        url, expires_at = await store.url(KEY, expires_in=600)

        assert url.startswith(f"{store.endpoint_url}/{store.bucket}/{KEY}?")
        assert "X-Amz-Expires=600" in url
        assert before + timedelta(seconds=600) <= expires_at <= utcnow() + timedelta(seconds=600)
        async with httpx.AsyncClient() as client:
            response = await client.get(url)
        assert response.status_code == 200
        assert response.content == data
        assert response.headers["content-type"] == "application/octet-stream"

    async def test_public_endpoint(self, moto_endpoint: str) -> None:
        store = S3Store(
            new_bucket(),
            endpoint_url=moto_endpoint,
            public_endpoint_url="https://assets.example.com",
        )
        await store.start()

        url, _ = await store.url(KEY, expires_in=60)

        assert url.startswith(f"https://assets.example.com/{store.bucket}/{KEY}?")
        await store.aclose()

    @pytest.mark.parametrize("expires_in", [0, 7 * 24 * 3600 + 1])
    async def test_refuses_bad_ttl(self, store: S3Store, expires_in: int) -> None:
        with pytest.raises(ValueError, match="expires_in"):
            await store.url(KEY, expires_in=expires_in)


class TestPing:
    async def test_reachable(self, store: S3Store) -> None:
        await store.ping()

    async def test_stopped_server(self) -> None:
        server = start_moto()
        store = S3Store(new_bucket(), endpoint_url=endpoint_of(server), max_attempts=1)
        await store.start()
        await store.ping()

        stop_moto(server)

        with pytest.raises(StorageUnavailableError):
            await store.ping()
        with pytest.raises(StorageUnavailableError):
            await store.put(KEY, b"x", content_type="text/plain")
        await store.aclose()


class TestFromURL:
    async def test_credentials_in_url(
        self, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        # Without the variables only the URL's credentials can sign the requests.
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        bucket = new_bucket()
        settings = make_settings(
            tmp_path,
            storage_url=f"s3://AKIDTEST:se%2Fcr%2Bet@{bucket}/pfx?endpoint_url={moto_endpoint}",
        )
        store = create_store(settings)
        await store.start()

        await store.put(KEY, b"via url", content_type="text/plain")

        assert await store.get(KEY) == b"via url"
        await store.aclose()
