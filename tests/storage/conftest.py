"""Helpers for the storage tests, and a real S3 API: moto's server, in a thread, on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from moto.server import ThreadedMotoServer


def split_url(url: str) -> tuple[str, int, str]:
    """The key, expiry and signature of a local-folder asset URL, as the API route sees them."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    key = unquote(parts.path.removeprefix("/v1/assets/"))
    return key, int(query["expires"][0]), query["signature"][0]


def start_moto() -> ThreadedMotoServer:
    # Port 0: the kernel picks a free port, so parallel runs never collide.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    return server


def endpoint_of(server: ThreadedMotoServer) -> str:
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


def stop_moto(server: ThreadedMotoServer) -> None:
    server.stop()
    # `stop()` leaves the listening socket open: clients would then hang in the backlog
    # instead of being refused, and the socket would leak a ResourceWarning.
    wsgi_server = server._server
    if wsgi_server is not None:
        wsgi_server.server_close()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server = start_moto()
    yield endpoint_of(server)
    stop_moto(server)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials, and nothing from the developer's own AWS setup."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
