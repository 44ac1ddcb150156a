"""The SSRF guard: what it refuses, what the allow-list lets through, how it pins the address."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest

from aigen.config import Settings
from aigen.notifications.ssrf import (
    IPAddress,
    UnresolvableHostError,
    UnsafeURLError,
    check_without_resolving,
    resolve,
    validate_url,
)

# Names only this resolver knows: one rebinds to loopback, one to the metadata service.
FAKE_DNS: dict[str, list[str]] = {
    "rebind.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "mixed.test": ["93.184.216.34", "10.0.0.7"],
    "public.test": ["93.184.216.34"],
    "nowhere.test": [],
    "xn--bcher-kva.test": ["93.184.216.34"],
}


async def fake_resolver(host: str, port: int) -> Sequence[IPAddress]:
    if host in FAKE_DNS:
        return [ipaddress.ip_address(a) for a in FAKE_DNS[host]]
    return await resolve(host, port)  # `localhost` comes from /etc/hosts


# (url, a network that allows it). Svix's `is_allowed` cases come first.
REFUSED: list[tuple[str, str]] = [
    ("http://10.254.0.0/", "10.0.0.0/8"),
    ("http://192.168.10.65/", "192.168.0.0/16"),
    ("http://172.16.10.65/", "172.16.0.0/12"),
    ("http://0.1.2.3/", "0.0.0.0/8"),
    ("http://0.0.0.0/", "0.0.0.0/8"),
    ("http://127.0.0.1/", "127.0.0.0/8"),
    ("http://169.254.45.1/", "169.254.0.0/16"),
    ("http://255.255.255.255/", "255.255.255.255/32"),
    ("http://192.0.2.255/", "192.0.2.0/24"),
    ("http://198.51.100.65/", "198.51.100.0/24"),
    ("http://203.0.113.6/", "203.0.113.0/24"),
    ("http://100.100.0.0/", "100.64.0.0/10"),
    ("http://192.0.0.0/", "192.0.0.0/24"),
    ("http://192.0.0.255/", "192.0.0.0/24"),
    ("http://250.10.20.30/", "240.0.0.0/4"),
    ("http://198.18.0.0/", "198.18.0.0/15"),
    ("http://[::1]/", "::1/128"),
    ("http://[::ffff:127.0.0.1]/", "127.0.0.0/8"),
    ("http://[::ffff:0.0.0.1]/", "0.0.0.0/8"),
    # Cloud metadata, in several spellings.
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254/32"),
    ("http://[::ffff:169.254.169.254]/", "169.254.0.0/16"),
    ("http://[64:ff9b::a9fe:a9fe]/", "169.254.0.0/16"),
    ("http://metadata.test/", "169.254.0.0/16"),
    # Numeric spellings of 127.0.0.1, as inet_aton reads them.
    ("http://2130706433/", "127.0.0.0/8"),
    ("http://0x7f000001/", "127.0.0.0/8"),
    ("http://0177.0.0.1/", "127.0.0.0/8"),
    ("http://127.1/", "127.0.0.0/8"),
    ("http://0x7f.0.0.1:8080/x", "127.0.0.0/8"),
    ("http://[::ffff:7f00:1]/", "127.0.0.0/8"),
    ("http://[::127.0.0.1]/", "127.0.0.0/8"),
    ("http://[2002:c0a8:101::1]/", "192.168.0.0/16"),
    # Names that resolve to loopback.
    ("http://localhost:8000/hook", "127.0.0.0/8"),
    ("http://LocalHost./hook", "127.0.0.0/8"),
    ("http://rebind.test/", "127.0.0.0/8"),
    # IPv6 private, link-local, multicast, unspecified; IPv4 multicast and shared.
    ("http://[fe80::1]/", "fe80::/10"),
    ("http://[fd12:3456::1]/", "fc00::/7"),
    ("http://[ff02::1]/", "ff00::/8"),
    ("http://[::]/", "::/128"),
    ("http://224.0.0.1/", "224.0.0.0/4"),
    ("https://100.64.0.1/", "100.64.0.0/10"),
    ("http://mixed.test/", "10.0.0.0/8"),
]


class TestRefused:
    def test_table_is_large(self) -> None:
        assert len(REFUSED) >= 30

    @pytest.mark.parametrize(("url", "network"), REFUSED)
    async def test_refused_with_empty_allow_list(
        self, settings: Settings, url: str, network: str
    ) -> None:
        empty = settings.model_copy(update={"webhook_allow_networks": []})
        with pytest.raises(UnsafeURLError, match="webhooks may not call it"):
            await validate_url(url, empty, resolver=fake_resolver)

    @pytest.mark.parametrize(("url", "network"), REFUSED)
    async def test_allowed_when_listed(self, settings: Settings, url: str, network: str) -> None:
        listed = settings.model_copy(update={"webhook_allow_networks": [network, "93.184.0.0/16"]})
        checked = await validate_url(url, listed, resolver=fake_resolver)
        assert checked.ip == checked.addresses[0] or checked.ip.version == 4  # mapped → IPv4

    async def test_message_names_the_address_and_the_rule(self, settings: Settings) -> None:
        empty = settings.model_copy(update={"webhook_allow_networks": []})
        with pytest.raises(UnsafeURLError) as caught:
            await validate_url("http://metadata.test/x", empty, resolver=fake_resolver)
        assert "169.254.169.254" in str(caught.value)
        assert "link-local" in str(caught.value)
        assert isinstance(caught.value, ValueError)


class TestAllowed:
    @pytest.mark.parametrize(
        ("url", "ip"),
        [
            ("http://1.1.1.1/", "1.1.1.1"),
            ("https://8.8.8.8:8443/path?q=1", "8.8.8.8"),
            ("http://[2001:4860:4860::8888]/", "2001:4860:4860::8888"),
            ("http://[::ffff:8.8.8.8]/", "8.8.8.8"),
            ("https://public.test/hooks", "93.184.216.34"),
        ],
    )
    async def test_public_addresses(self, settings: Settings, url: str, ip: str) -> None:
        empty = settings.model_copy(update={"webhook_allow_networks": []})
        checked = await validate_url(url, empty, resolver=fake_resolver)
        assert checked.ip == ipaddress.ip_address(ip)


class TestMalformed:
    @pytest.mark.parametrize(
        "url",
        [
            "ftp://1.1.1.1/",
            "file:///etc/passwd",
            "gopher://1.1.1.1/",
            "http://",
            "http:///path",
            "http://exa mple.com/",
            "http://evil.com\\@1.1.1.1/",
            "http://1.1.1.1:99999/",
            "http://1.1.1.1:0/",
            "http://999.1.1.1/",
            "http://08.1.1.1/",
            "http://[fe80::1%25eth0]/",
            "http://under_score!.com/",
        ],
    )
    async def test_refused(self, settings: Settings, url: str) -> None:
        with pytest.raises(UnsafeURLError):
            await validate_url(url, settings, resolver=fake_resolver)

    async def test_https_only(self, settings: Settings) -> None:
        with pytest.raises(UnsafeURLError, match="must be https"):
            await validate_url("http://1.1.1.1/", settings, https_only=True)
        checked = await validate_url("https://1.1.1.1/", settings, https_only=True)
        assert checked.scheme == "https"

    async def test_name_without_addresses(self, settings: Settings) -> None:
        with pytest.raises(UnresolvableHostError):
            await validate_url("http://nowhere.test/", settings, resolver=fake_resolver)


class TestWithoutResolving:
    """The check at `POST /v1/generate` remembers the URLs that passed: an answer given
    under one allow-list or scheme rule must never stand for another."""

    def test_each_setting_gets_its_own_answer(self, settings: Settings) -> None:
        url = "http://10.1.2.3/hook"
        allowed = settings.model_copy(update={"webhook_allow_networks": ["10.0.0.0/8"]})
        empty = settings.model_copy(update={"webhook_allow_networks": []})
        for _ in range(2):  # the second time from memory
            check_without_resolving(url, allowed)
            with pytest.raises(UnsafeURLError, match="private"):
                check_without_resolving(url, empty)
            with pytest.raises(UnsafeURLError, match="must be https"):
                check_without_resolving(url, allowed, https_only=True)

    def test_a_host_name_waits_for_the_attempt(self, settings: Settings) -> None:
        empty = settings.model_copy(update={"webhook_allow_networks": []})
        check_without_resolving("http://rebind.test/hook", empty)  # resolved at each attempt


class TestPinnedURL:
    async def test_target_is_the_checked_address(self, settings: Settings) -> None:
        checked = await validate_url(
            "https://user:pw@Public.TEST:8443/a%20b?x=1", settings, resolver=fake_resolver
        )
        assert str(checked.target) == "https://user:pw@93.184.216.34:8443/a%20b?x=1"
        assert checked.host_header == "public.test:8443"
        assert checked.sni_hostname == "public.test"

    async def test_default_port_left_out_of_host(self, settings: Settings) -> None:
        checked = await validate_url("https://public.test/", settings, resolver=fake_resolver)
        assert checked.host_header == "public.test"
        assert checked.port == 443

    async def test_ip_hosts_send_no_sni(self, settings: Settings) -> None:
        checked = await validate_url("https://[2001:4860:4860::8888]/", settings)
        assert checked.sni_hostname is None
        assert checked.host_header == "[2001:4860:4860::8888]"

    async def test_idna_host(self, settings: Settings) -> None:
        checked = await validate_url("https://bücher.test/", settings, resolver=fake_resolver)
        assert checked.host == "xn--bcher-kva.test"
