"""Requests go to the checked address, never resolved again, with the original Host and SNI."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path

import httpx
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


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
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
        async with sender.default_http_client(settings) as client:
            request = pinned_request(client, checked, content=b"{}")
            response = await client.send(request)
        assert response.status_code == 200
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
        async with httpx.AsyncClient(verify=trust, trust_env=False) as client:
            response = await client.send(pinned_request(client, checked, content=b"{}"))
        assert response.status_code == 200
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
        async with httpx.AsyncClient(verify=trust, trust_env=False) as client:
            with pytest.raises(httpx.ConnectError, match=r"certificate|hostname"):
                await client.send(pinned_request(client, checked, content=b"{}"))
        assert receiver.requests == []
