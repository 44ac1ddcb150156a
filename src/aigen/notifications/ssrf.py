"""SSRF guard for webhook URLs: resolve once, check every address, connect to the one checked.

`validate_url` parses the URL with one parser, resolves the host, and refuses loopback,
private, link-local (cloud metadata), shared (100.64/10), reserved, documentation,
multicast and unspecified addresses, including the IPv6 forms that embed an IPv4 address
(IPv4-mapped, IPv4-compatible, NAT64, 6to4). Numeric hosts are read the way `inet_aton`
reads them (`2130706433`, `0x7f000001`, `0177.0.0.1` are all 127.0.0.1), so no spelling
slips past. Networks in `settings.webhook_allow_networks` are allowed despite the rules.

The result pins the address: `pinned_request` sends to the checked IP while the `Host`
header and the TLS SNI (and so certificate verification) carry the original host name, so
there is no second DNS lookup for an attacker to rebind.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

import httpx
import yarl

from aigen.config import Settings

if TYPE_CHECKING:
    # Only for the annotations: the API imports this module for its checks, and aiohttp
    # (the sender's client) would add 6 MiB to its resident size.
    import aiohttp

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]

DEFAULT_PORTS = {"http": 80, "https": 443}

_BLOCKED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), reason)
    for cidr, reason in (
        ("0.0.0.0/8", "unspecified ('this network')"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved (IETF protocol assignments)"),
        ("192.0.2.0/24", "reserved (documentation)"),
        ("192.88.99.0/24", "reserved (6to4 relay anycast)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved (benchmarking)"),
        ("198.51.100.0/24", "reserved (documentation)"),
        ("203.0.113.0/24", "reserved (documentation)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # 255.255.255.255 (broadcast) included
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "reserved (local-use NAT64)"),
        ("100::/64", "reserved (discard-only)"),
        ("2001::/23", "reserved (IETF protocol assignments, Teredo)"),
        ("2001:db8::/32", "reserved (documentation)"),
        ("3fff::/20", "reserved (documentation)"),
        ("fc00::/7", "private (unique local)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)

_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# What a URL host may be once IDNA-encoded; anything else is refused rather than guessed at.
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_-]{1,63})*\.?")
# A host made of numbers is an IPv4 address (WHATWG URL), never a name to look up.
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?", re.IGNORECASE)
_UNSAFE_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


class UnsafeURLError(ValueError):
    """The URL may not be called: bad form, refused scheme, or an address the guard refuses."""


class UnresolvableHostError(UnsafeURLError):
    """The host name did not resolve (DNS failure); a later attempt may succeed."""


@dataclass(frozen=True, slots=True)
class CheckedURL:
    """A URL that passed the guard, with the one address every request must connect to."""

    url: str
    scheme: str
    host: str
    port: int
    ip: IPAddress
    addresses: tuple[IPAddress, ...]
    target: yarl.URL

    @property
    def host_header(self) -> str:
        """The `Host` header: the name as given (IDNA), with the port when not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"

    @property
    def sni_hostname(self) -> str | None:
        """The TLS server name (checked against the certificate); None for IP hosts."""
        if self.scheme != "https" or _literal_ip(self.host) is not None:
            return None
        return self.host.rstrip(".")


@dataclass(frozen=True, slots=True)
class _Split:
    parts: SplitResult
    scheme: str
    host: str
    port: int
    literal: IPAddress | None


def _split(url: str, *, https_only: bool) -> _Split:
    if _UNSAFE_CHARS.search(url):
        raise UnsafeURLError("the URL contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURLError(f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or (https_only and scheme != "https"):
        allowed = "https" if https_only else "http or https"
        raise UnsafeURLError(f"the URL scheme must be {allowed}, not {scheme or 'missing'!r}")
    if not parts.hostname:
        raise UnsafeURLError("the URL has no host")
    port = DEFAULT_PORTS[scheme] if port is None else port
    if port == 0:
        raise UnsafeURLError("port 0 cannot be called")
    host = _ascii_host(parts.hostname)
    return _Split(parts, scheme, host, port, _literal_ip(host))


def _check_addresses(split: _Split, addresses: Sequence[IPAddress], cidrs: Iterable[str]) -> None:
    allow = allow_networks(cidrs)
    for address in addresses:
        reason = refusal(address, allow)
        if reason is not None:
            verb = "resolves to" if split.literal is None else "is"
            raise UnsafeURLError(
                f"{split.parts.hostname!r} {verb} {address}, a {reason} address; webhooks "
                "may not call it (AIGEN_WEBHOOK_ALLOW_NETWORKS lists networks to allow)"
            )


def check_without_resolving(url: str, settings: Settings, *, https_only: bool = False) -> None:
    """Every check `validate_url` makes that needs no DNS: the form, the scheme, the port,
    and an address written in the URL. For a first answer at once (a job's
    `webhook_url`); a host name is still resolved and checked at each attempt."""
    _check_form(url, https_only, tuple(settings.webhook_allow_networks))


# A client sends the same webhook URL with every job: a URL that passed is remembered
# (its checks took a few per cent of the accept path's CPU); one refused is not.
@lru_cache(maxsize=1024)
def _check_form(url: str, https_only: bool, allow: tuple[str, ...]) -> None:
    split = _split(url, https_only=https_only)
    if split.literal is not None:
        _check_addresses(split, [split.literal], allow)


async def validate_url(
    url: str,
    settings: Settings,
    *,
    https_only: bool = False,
    resolver: Resolver | None = None,
) -> CheckedURL:
    """Check `url` and return it pinned to its checked address; raise `UnsafeURLError`."""
    split = _split(url, https_only=https_only)
    parts, scheme, host, port = split.parts, split.scheme, split.host, split.port
    addresses: Sequence[IPAddress] = (
        [split.literal]
        if split.literal is not None
        else await (resolver or resolve)(host.rstrip("."), port)
    )
    if not addresses:
        raise UnresolvableHostError(f"{host!r} did not resolve to any address")
    _check_addresses(split, addresses, settings.webhook_allow_networks)
    # Connect over IPv4 to an IPv4-mapped address: the same host, without needing IPv6.
    ip = addresses[0]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    raw_path = parts.path or "/"
    if parts.query:
        raw_path += "?" + parts.query
    # The URL as given (its userinfo, path and query as they were written), with the
    # checked address for the host.
    address = f"[{ip}]" if ip.version == 6 else str(ip)
    credentials = f"{userinfo}@" if userinfo else ""
    target = yarl.URL(f"{scheme}://{credentials}{address}:{port}{raw_path}", encoded=True)
    return CheckedURL(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        ip=ip,
        addresses=tuple(addresses),
        target=target,
    )


def pinned_request(
    session: aiohttp.ClientSession,
    checked: CheckedURL,
    *,
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
    """A request on `session` that connects to `checked.ip` but speaks to `checked.host`.

    The connection never resolves the name again; `Host` and, for https, the SNI and the
    certificate check use the original host name (aiohttp's `server_hostname`).
    Redirects are never followed.
    """
    all_headers = {**(headers or {}), "Host": checked.host_header}
    return session.request(
        method,
        checked.target,
        headers=all_headers,
        data=content,
        allow_redirects=False,
        server_hostname=checked.sni_hostname,
    )


def refusal(address: IPAddress, allow: Iterable[IPNetwork] = ()) -> str | None:
    """Why the guard refuses `address` (e.g. "loopback"), or None when it may be called."""
    candidates = [address, *_embedded_ipv4(address)]
    for network in allow:
        if any(_contains(network, candidate) for candidate in candidates):
            return None
    for candidate in candidates:
        for network, reason in _BLOCKED:
            if _contains(network, candidate):
                return reason
    return None


@lru_cache(maxsize=32)
def _allow_networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs)


def allow_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The allow-list as networks (a bad CIDR raises ValueError)."""
    return _allow_networks(tuple(cidrs))


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the system's preference order."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableHostError(f"could not resolve {host!r}: {exc}") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        # Strip an IPv6 zone (`fe80::1%eth0`): the address itself is what is judged.
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Read a numeric host as `inet_aton` does (1 to 4 parts; decimal, 0x hex, 0 octal).

    Returns None when `host` is not numeric; raises `UnsafeURLError` when it is numeric but
    no valid address (such a host is never looked up as a name).
    """
    if not _NUMERIC_HOST.fullmatch(host):
        return None
    parts = host.rstrip(".").split(".")
    values: list[int] = []
    for part in parts:
        lowered = part.lower()
        if lowered.startswith("0x"):
            values.append(int(lowered[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            if not set(part) <= set("01234567"):
                raise UnsafeURLError(f"{host!r} is not a valid IPv4 address")
            values.append(int(part, 8))
        else:
            values.append(int(part))
    *head, last = values
    if any(value > 255 for value in head) or last >= 256 ** (4 - len(head)):
        raise UnsafeURLError(f"{host!r} is not a valid IPv4 address")
    number = sum(value << (8 * (3 - index)) for index, value in enumerate(head)) + last
    return ipaddress.IPv4Address(number)


def _literal_ip(host: str) -> IPAddress | None:
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise UnsafeURLError(f"{host!r} is not a valid IPv6 address") from None
    return parse_legacy_ipv4(host)


def _ascii_host(hostname: str) -> str:
    if "%" in hostname:
        raise UnsafeURLError("scoped IPv6 addresses and percent-encoded hosts are refused")
    if ":" in hostname:
        return hostname
    if not hostname.isascii():
        try:
            hostname = httpx.URL(scheme="http", host=hostname).raw_host.decode("ascii")
        except (httpx.InvalidURL, UnicodeError) as exc:
            raise UnsafeURLError(f"not a valid host name: {exc}") from None
    hostname = hostname.lower()
    if not _HOSTNAME.fullmatch(hostname) or len(hostname) > 253:
        raise UnsafeURLError(f"{hostname!r} is not a valid host name")
    return hostname


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries: mapped, compatible, SIIT, NAT64, 6to4."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    embedded: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        embedded.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        embedded.append(address.sixtofour)
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    in_compatible = address in _V4_COMPATIBLE and int(address) > 1  # not :: or ::1
    if in_compatible or address in _SIIT or address in _NAT64:
        embedded.append(low32)
    return embedded


def _contains(network: IPNetwork, address: IPAddress) -> bool:
    return network.version == address.version and address in network
