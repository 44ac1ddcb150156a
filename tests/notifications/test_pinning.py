"""Requests go to the checked address, never resolved again, with the original Host and SNI."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from aigen.clock import utcnow
from aigen.config import Settings
from aigen.notifications import sender
from aigen.notifications.ssrf import IPAddress, pinned_request, validate_url

from .receiver import WebhookReceiverDouble

x509 = pytest.importorskip("cryptography.x509")
hashes = pytest.importorskip("cryptography.hazmat.primitives.hashes")
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
ec = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ec")


async def loopback_resolver(host: str, port: int) -> Sequence[IPAddress]:
    """`*.test` names no real resolver knows; they all point at the receiver."""
    assert host.endswith(".test"), host
    return [ipaddress.ip_address("127.0.0.1")]


def self_signed(tmp_path: Path, name: str, *more_names: str) -> tuple[Path, Path]:
    """A certificate (and its key) valid for `name` and `more_names`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    names = [x509.DNSName(n) for n in (name, *more_names)]
    now = utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
async def tls_receiver(tmp_path: Path) -> AsyncIterator[tuple[WebhookReceiverDouble, Path]]:
    cert, key = self_signed(tmp_path, "hooks.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with WebhookReceiverDouble(ssl_context=context) as double:
        yield double, cert


class TestPinnedRequest:
    async def test_http_sends_the_original_host(
        self, settings: Settings, receiver: WebhookReceiverDouble
    ) -> None:
        checked = await validate_url(
            receiver.url("/in?x=1", host="hooks.test"), settings, resolver=loopback_resolver
        )
        async with (
            sender.default_http_client(settings) as client,
            pinned_request(client, checked, content=b"{}") as response,
        ):
            assert response.status == 200
        (received,) = receiver.requests
        assert received.headers["host"] == f"hooks.test:{receiver.port}"
        assert (received.method, received.path, received.body) == ("POST", "/in?x=1", b"{}")

    async def test_https_sni_and_certificate_use_the_name(
        self, settings: Settings, tls_receiver: tuple[WebhookReceiverDouble, Path]
    ) -> None:
        receiver, cert = tls_receiver
        trust = ssl.create_default_context(cafile=str(cert))
        checked = await validate_url(
            receiver.url(host="hooks.test"), settings, resolver=loopback_resolver
        )
        async with (
            sender.default_http_client(settings, verify=trust) as client,
            pinned_request(client, checked, content=b"{}") as response,
        ):
            assert response.status == 200
        assert receiver.sni_names == ["hooks.test"]
        assert receiver.requests[0].headers["host"] == f"hooks.test:{receiver.port}"

    async def test_https_certificate_for_another_name_fails(
        self, settings: Settings, tls_receiver: tuple[WebhookReceiverDouble, Path]
    ) -> None:
        receiver, cert = tls_receiver
        trust = ssl.create_default_context(cafile=str(cert))
        checked = await validate_url(
            receiver.url(host="other.test"), settings, resolver=loopback_resolver
        )
        async with sender.default_http_client(settings, verify=trust) as client:
            with pytest.raises(aiohttp.ClientConnectorError, match=r"certificate|hostname"):
                async with pinned_request(client, checked, content=b"{}"):
                    pass
        assert receiver.requests == []


class TestKeptConnections:
    """Attempts reuse connections, but only within one host name (`sender.Clients`)."""

    async def post(
        self, clients: sender.Clients, url: str, settings: Settings
    ) -> sender.AttemptResult:
        return await sender.post(
            clients.for_url(url), url, settings=settings, headers={}, body=b"{}",
            resolver=loopback_resolver,
        )  # fmt: skip

    async def test_one_host_name_reuses_its_connection(self, settings: Settings) -> None:
        clients = sender.Clients(lambda: sender.default_http_client(settings))
        async with WebhookReceiverDouble(keep_alive_seconds=5) as receiver:
            for _ in range(3):
                result = await self.post(clients, receiver.url(host="hooks.test"), settings)
                assert result.ok, result
            await clients.aclose()
        assert len(receiver.requests) == 3
        assert receiver.connections == 1

    async def test_names_on_one_address_never_share_a_tls_session(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        cert, key = self_signed(tmp_path, "hooks.test", "other.test")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        trust = ssl.create_default_context(cafile=str(cert))
        clients = sender.Clients(lambda: sender.default_http_client(settings, verify=trust))
        async with WebhookReceiverDouble(ssl_context=context, keep_alive_seconds=5) as receiver:
            for host in ("hooks.test", "other.test", "hooks.test", "other.test"):
                result = await self.post(clients, receiver.url(host=host), settings)
                assert result.ok, result
            await clients.aclose()
        # Both names resolve to 127.0.0.1: each still got its own connection, its own
        # TLS handshake for its own name, and kept it.
        assert receiver.sni_names == ["hooks.test", "other.test"]
        assert receiver.connections == 2
        hosts = [r.headers["host"].partition(":")[0] for r in receiver.requests]
        assert hosts == ["hooks.test", "other.test", "hooks.test", "other.test"]

    async def test_a_connection_the_server_dropped_is_not_reused(self, settings: Settings) -> None:
        clients = sender.Clients(lambda: sender.default_http_client(settings))
        async with WebhookReceiverDouble(keep_alive_seconds=0.05) as receiver:
            assert (await self.post(clients, receiver.url(host="hooks.test"), settings)).ok
            await asyncio.sleep(0.3)  # the server has closed it meanwhile
            result = await self.post(clients, receiver.url(host="hooks.test"), settings)
            await clients.aclose()
        assert result.ok, result
        assert receiver.connections == 2

    async def test_the_least_recently_used_origin_is_closed_later(self, settings: Settings) -> None:
        made: list[aiohttp.ClientSession] = []

        def factory() -> aiohttp.ClientSession:
            made.append(sender.default_http_client(settings))
            return made[-1]

        clients = sender.Clients(factory, max_clients=2, linger_seconds=0.05)
        first = clients.for_url("http://a.test/hook")
        assert clients.for_url("http://A.TEST/other?x=1") is first  # one origin
        second = clients.for_url("http://b.test/hook")
        assert clients.for_url("http://a.test/again") is first  # now the most recent
        clients.for_url("https://a.test/hook")  # a third origin pushes out b.test
        assert len(made) == 3
        assert not second.closed  # an attempt may still be using it
        await asyncio.sleep(0.2)
        assert second.closed
        assert not first.closed
        await clients.aclose()
        assert all(client.closed for client in made)

    async def test_closing_closes_the_lingering_too(self, settings: Settings) -> None:
        clients = sender.Clients(
            lambda: sender.default_http_client(settings), max_clients=1, linger_seconds=60
        )
        pushed_out = clients.for_url("http://a.test/hook")
        kept = clients.for_url("http://b.test/hook")
        await clients.aclose()
        assert pushed_out.closed
        assert kept.closed
