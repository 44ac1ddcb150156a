from __future__ import annotations

from pathlib import Path

import pytest

from aigen.clock import utcnow
from aigen.storage import FilesystemStore, S3Store, create_store
from aigen.storage.filesystem import verify_signed_url
from tests.conftest import make_settings

from .conftest import split_url


class TestFile:
    def test_default_is_the_data_folder(self, tmp_path: Path) -> None:
        store = create_store(make_settings(tmp_path))

        assert isinstance(store, FilesystemStore)
        assert store.root == tmp_path.resolve() / "assets"

    def test_relative_path(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)

        store = create_store(make_settings(tmp_path, storage_url="file://./data/assets"))

        assert isinstance(store, FilesystemStore)
        assert store.root == tmp_path.resolve() / "data" / "assets"

    def test_absolute_path(self, tmp_path: Path) -> None:
        store = create_store(make_settings(tmp_path, storage_url=f"file://{tmp_path}/a%20b"))

        assert isinstance(store, FilesystemStore)
        assert store.root == tmp_path.resolve() / "a b"

    def test_localhost_host(self, tmp_path: Path) -> None:
        store = create_store(make_settings(tmp_path, storage_url=f"file://localhost{tmp_path}"))

        assert isinstance(store, FilesystemStore)
        assert store.root == tmp_path.resolve()

    async def test_signs_with_the_server_secret(self, tmp_path: Path) -> None:
        settings = make_settings(tmp_path, public_url="http://127.0.0.1:9999")
        store = create_store(settings)

        url, _ = await store.url("assets/a/b/0.txt", expires_in=60)

        assert url.startswith("http://127.0.0.1:9999/v1/assets/assets/a/b/0.txt?")
        key, expires, signature = split_url(url)
        secret = settings.resolved_secret()
        assert verify_signed_url(key, expires, signature, secret=secret, now=utcnow())


class TestS3:
    def test_every_option(self, tmp_path: Path) -> None:
        url = (
            "s3://aigen-assets/tenant/a?endpoint_url=http://127.0.0.1:9000&region=eu-west-1"
            "&addressing_style=virtual&public_endpoint_url=https://cdn.example.com"
        )

        store = create_store(make_settings(tmp_path, storage_url=url))

        assert isinstance(store, S3Store)
        assert store.bucket == "aigen-assets"
        assert store.prefix == "tenant/a"
        assert store.endpoint_url == "http://127.0.0.1:9000"
        assert store.public_endpoint_url == "https://cdn.example.com"
        assert store.region == "eu-west-1"
        assert store.addressing_style == "virtual"

    def test_path_style_by_default_with_an_endpoint(self, tmp_path: Path) -> None:
        url = "s3://aigen-assets?endpoint_url=http://127.0.0.1:9000"

        store = create_store(make_settings(tmp_path, storage_url=url))

        assert isinstance(store, S3Store)
        assert store.prefix == ""
        assert store.addressing_style == "path"

    def test_aws_defaults(self, tmp_path: Path) -> None:
        store = create_store(make_settings(tmp_path, storage_url="s3://aigen-assets/"))

        assert isinstance(store, S3Store)
        assert store.endpoint_url is None
        assert store.region is None
        assert store.addressing_style == "auto"


class TestInvalid:
    @pytest.mark.parametrize(
        ("url", "message"),
        [
            ("ftp://host/x", "file:// or s3://"),
            ("./data/assets", "file:// or s3://"),
            ("file://", "needs a folder"),
            ("s3://", "needs a bucket"),
            ("s3://bucket:9000", "needs a bucket"),
            ("s3://AKID@bucket", "KEY_ID:SECRET"),
            ("s3://bucket?endpoint=http://x", "unknown s3:// storage URL options: endpoint"),
            ("s3://bucket?addressing_style=host", "addressing_style"),
            ("s3://bucket/../x", "invalid storage key"),
        ],
    )
    def test_refused(self, tmp_path: Path, url: str, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            create_store(make_settings(tmp_path, storage_url=url))
