"""What a webhook may reach and when it is tried again: pure, no I/O.

Addresses: a delivery goes only to public unicast addresses (`ipaddress`'s `is_global`), never to
loopback, private, shared (CGNAT), link-local (cloud metadata at 169.254.169.254), multicast,
reserved or unspecified ones, nor to those hidden inside IPv4-mapped or NAT64 IPv6 addresses, nor
to the metadata addresses some tables call public (Azure's 168.63.129.16, Oracle's 192.0.0.192),
unless the operator's allow-list (`TRACKER_WEBHOOK_ALLOW`: IPs, CIDR networks or host names) names
them.

Retries: attempt n (1, 2, ...) failed -> the next in min(cap, base * 2**(n-1)) scaled by a random
factor in [0.5, 1) ("equal jitter": never two endpoints' retries in lockstep, never sooner than
half the step), and never after the event's retry window (3 days by default): one last attempt at
its end, then the dead-letter state.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
URL_MAX: Final = 2_048
METADATA: Final = frozenset(
    ipaddress.ip_address(a) for a in ("168.63.129.16", "169.254.169.254", "192.0.0.192", "fd00:ec2::254")
)
NAT64: Final = ipaddress.ip_network("64:ff9b::/96")


class Refused(ValueError):
    """A URL or an address a webhook may not use; the message says why."""


@dataclass(frozen=True, slots=True)
class Target:
    scheme: str
    host: str  # as written (lower-cased), without brackets
    port: int
    path: str  # path and query, as sent in the request line

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.scheme == "https" else 80) else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    """An absolute http(s) URL without credentials or fragment (Refused otherwise)."""
    if not isinstance(url, str) or not 1 <= len(url) <= URL_MAX or any(c in url for c in " \t\r\n\x00"):
        raise Refused(f"url: an http(s) URL of at most {URL_MAX} characters, without spaces")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused("url: must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise Refused("url: no credentials and no fragment")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Refused("url: invalid port") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname.lower(), port, path)


@dataclass(frozen=True, slots=True)
class AllowList:
    networks: tuple[Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        networks: list[Network] = []
        hosts: set[str] = set()
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                hosts.add(entry.strip().lower().rstrip("."))
        return cls(tuple(networks), frozenset(h for h in hosts if h))

    def names(self, host: str, ip: IP) -> bool:
        return host.rstrip(".") in self.hosts or any(ip in net for net in self.networks if net.version == ip.version)


def _inner(ip: IP) -> IP | None:
    """The IPv4 address an IPv6 one carries (IPv4-mapped, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked(ip: IP) -> str | None:
    """Why a delivery may not go to `ip` (None: it may)."""
    inner = _inner(ip)
    if inner is not None:
        return blocked(inner)
    if ip in METADATA:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global or ip.is_multicast:
        return "not a public unicast address"
    return None


def check(host: str, addresses: Iterable[str], allow: AllowList) -> list[str]:
    """The addresses a delivery to `host` may use, in resolver order: every one must pass (a name
    resolving to one public and one private address is refused whole: the OS could pick either)."""
    out: list[str] = []
    for raw in addresses:
        ip = ipaddress.ip_address(raw.split("%", 1)[0])
        why = None if allow.names(host, ip) else blocked(ip)
        if why is not None:
            raise Refused(f"{host} resolves to {ip}, {why} (not in TRACKER_WEBHOOK_ALLOW)")
        out.append(str(ip))
    if not out:
        raise Refused(f"{host} resolves to no address")
    return out


def next_attempt(
    attempts: int, now: int, created: int, *, base_s: float, cap_s: float, window_s: float, u: float
) -> int | None:
    """When to try again after `attempts` failed ones (ms), or None: the retry window is over
    (dead-letter). `u` is uniform in [0, 1) (the jitter; a parameter so that this stays pure)."""
    deadline = created + int(window_s * 1000)
    if now >= deadline:
        return None
    step = min(cap_s, base_s * 2 ** min(attempts - 1, 60)) * (0.5 + 0.5 * u)
    return min(now + max(1, int(step * 1000)), deadline)
