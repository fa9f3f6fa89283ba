"""Which callback URLs a job may carry: http(s) only, and no internal address unless allowed.

A callback makes the server send a request where the client says, so by default it may reach
only public addresses: loopback, private, link-local, shared (CGNAT), multicast, reserved and
unspecified ones are refused, IPv4 inside IPv6 (::ffff:10.0.0.1, 64:ff9b::/96) included. The
check runs at submit (a 400) and again right before each delivery on the addresses the host
resolves to then, and the delivery connects to the very address it checked: a host that
resolves to a public address at submit and to 127.0.0.1 later (DNS rebinding) is refused.

CONVQ_CALLBACK_ALLOW lists exceptions, comma-separated: networks in CIDR form (10.1.0.0/16,
127.0.0.1/32, fd00::/8) whose addresses are allowed, and host names (hooks.internal) whose
every address is allowed.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH = 2048
"""Characters of the longest callback URL accepted."""

SCHEMES = {"http": 80, "https": 443}
"""Callback schemes and their default ports."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


class CallbackRefused(ValueError):
    """A callback URL is malformed or points where this server may not send requests."""


class CallbackUnresolved(CallbackRefused):
    """A callback's host name does not resolve (now: it may later)."""


@dataclass(frozen=True)
class Allow:
    """The exceptions of CONVQ_CALLBACK_ALLOW: networks and host names callbacks may reach."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str | None) -> Allow:
        """Return the Allow of a comma-separated list; ValueError naming a bad item."""
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for item in (text or "").split(","):
            item = item.strip()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
                continue
            except ValueError:
                if "/" in item or ":" in item or not _HOST.fullmatch(item):
                    raise ValueError(
                        f"CONVQ_CALLBACK_ALLOW: {item!r} is neither a CIDR network "
                        "(10.0.0.0/8, 127.0.0.1/32) nor a host name"
                    ) from None
            hosts.add(item.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts))

    def allows(self, address: IPAddress) -> bool:
        return any(address in net for net in self.networks if net.version == address.version)


@dataclass(frozen=True)
class Target:
    """A parsed callback URL: where to connect, and what to ask for."""

    url: str
    scheme: str
    host: str  # lower case, without brackets
    port: int
    path: str  # path and query, at least "/"


def internal(address: IPAddress) -> bool:
    """True for an address a callback may not reach by default (anything not public)."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in _NAT64 else None
        )
        if mapped is not None:
            return internal(mapped)
    return (
        not address.is_global
        or address.is_multicast
        or address.is_reserved
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_private
    )


def parse(url: object) -> Target:
    """Return the Target of url; CallbackRefused when it is not an absolute http(s) URL."""
    if not isinstance(url, str) or not url:
        raise CallbackRefused("callback must be a URL string (http:// or https://)")
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"callback is {len(url)} characters; the limit is {MAX_URL_LENGTH}")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url) or not url.isascii():
        raise CallbackRefused("callback has spaces, control or non-ASCII characters; encode them")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackRefused(f"callback is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise CallbackRefused(
            f"callback scheme {parts.scheme or '(none)'!r} is not allowed; use http or https"
        )
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused(
            "callback must not carry credentials (user:password@): the payload is signed instead"
        )
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise CallbackRefused("callback has no host")
    if port == 0:
        raise CallbackRefused("callback port 0 is not a port")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url, scheme, host, port or SCHEMES[scheme], path)


Resolver = Callable[[str, int], list[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """Return the addresses host resolves to (socket.getaddrinfo, TCP)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def addresses(target: Target, allow: Allow, resolver: Resolver | None = None) -> list[str]:
    """Return the addresses target may be reached at now; CallbackRefused when none may.

    Every address the host resolves to must be public or allowed: a host that resolves to one
    public and one internal address is refused (a client could not choose which is used).
    """
    try:
        literal: IPAddress | None = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    if literal is not None:
        found = [str(literal)]
    else:
        try:
            found = (resolver or resolve_host)(target.host, target.port)
        except (OSError, UnicodeError) as exc:
            raise CallbackUnresolved(
                f"callback host {target.host!r} does not resolve: {exc}"
            ) from None
        if not found:
            raise CallbackUnresolved(f"callback host {target.host!r} has no address")
    if literal is None and target.host.lower() in allow.hosts:
        return found
    for text in found:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if internal(address) and not allow.allows(address):
            raise CallbackRefused(
                f"callback host {target.host!r} is at {address}, an internal address; "
                "callbacks go to public addresses unless CONVQ_CALLBACK_ALLOW lists it"
            )
    return found


def check(url: object, allow: Allow, resolver: Resolver | None = None) -> Target:
    """Return url's Target if a callback may go there now; CallbackRefused saying why not."""
    target = parse(url)
    addresses(target, allow, resolver)
    return target
