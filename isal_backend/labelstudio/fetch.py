"""HTTP for task images: SSRF-safe connections and a total deadline per download.

Anyone who can import a task chooses the URL the backend fetches, so, like Label Studio's own
``SSRF_PROTECTION_ENABLED`` (``core/utils/io.py``), an image host is connected to only if EVERY address its
name resolves to is public.  The check runs inside the connection itself (:class:`GuardedBackend`, an httpcore
network backend): the name is resolved once, every address is vetted, and the socket connects to a vetted
address, never to a second lookup's answer, so DNS rebinding between check and connect cannot happen; TLS SNI
and the Host header still use the name.  Every redirect hop opens its connection through the same backend, so
each hop is checked too.  Label Studio's own origins (the backend's Label Studio), allowlisted hosts and
networks, and ``ssrf_protection=False`` are exempt.

The deadline (:func:`deadline`) bounds a whole download, retries included: every connect, TLS handshake, read
and write gets at most the time left as its socket timeout, so a source that drips one byte a second is cut
off at the deadline instead of resetting a per-read timeout forever.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import httpcore
import httpx

if TYPE_CHECKING:
    from isal_backend.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: (host, port) -> the addresses to vet and connect to, in the order to try them.
Resolver = Callable[[str, int], Sequence[str]]

DEFAULT_DEADLINE_SECONDS = 30.0
_HOW_TO_ALLOW = ("image hosts must be public (ISAL_IMAGE_HOSTS_ALLOWED trusts a host or network; "
                 "ISAL_SSRF_PROTECTION=false turns the check off)")
# Ranges Python's ipaddress does not name on its own (3.11): carrier-grade NAT and NAT64's local-use prefix.
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")


class FetchRefused(Exception):
    """A connection the policy forbids (the host resolves to a non-public address).

    Not an httpcore/httpx error on purpose: httpx passes it through unchanged and no retry loop mistakes it for
    a transient network failure.  The message names the host and the reason, never a path or query.
    """

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"host {host} {reason}")
        self.host = host
        self.reason = reason


# ------------------------------------------------------------------------------------------ policy


@dataclass(frozen=True)
class DownloadPolicy:
    """How task images are fetched.  The defaults are the safe ones: protection on, nothing allowlisted."""

    ssrf_protection: bool = True
    #: Host names ("images.corp", or "*.corp" for any subdomain) and networks ("10.1.0.0/16", "127.0.0.1")
    #: whose images are fetched even though they resolve to non-public addresses.
    allowed: tuple[str, ...] = ()
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS

    def __post_init__(self) -> None:
        for entry in self.allowed:
            _parse_allowed(entry)  # raises ValueError on a bad entry
        if not self.deadline_seconds > 0:
            raise ValueError(f"deadline_seconds must be > 0, got {self.deadline_seconds!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> DownloadPolicy:
        """ISAL_SSRF_PROTECTION, ISAL_IMAGE_HOSTS_ALLOWED and ISAL_DOWNLOAD_DEADLINE_SECONDS."""
        return cls(ssrf_protection=settings.ssrf_protection, allowed=tuple(settings.image_hosts_allowed),
                   deadline_seconds=settings.download_deadline_seconds)

    @cached_property
    def _parsed(self) -> tuple[str | IPNetwork, ...]:
        return tuple(_parse_allowed(e) for e in self.allowed)

    def host_allowed(self, host: str) -> bool:
        """True when the host name itself is allowlisted (its addresses are then not vetted)."""
        host = _normal_host(host)
        return any(isinstance(p, str) and (host == p or (p.startswith("*.") and host.endswith(p[1:])))
                   for p in self._parsed)

    def networks(self) -> tuple[IPNetwork, ...]:
        """The allowlisted networks: an address in one of them is fetched even when it is not public."""
        return tuple(p for p in self._parsed if not isinstance(p, str))


def parse_allowed_entry(entry: str) -> str:
    """The normal form of one allowlist entry (a lower-case host name, ``*.domain``, or a CIDR network).

    Raises ValueError naming the entry when it is neither; settings.py uses it to validate the variable.
    """
    parsed = _parse_allowed(entry)
    return parsed if isinstance(parsed, str) else str(parsed)


def _parse_allowed(entry: str) -> str | IPNetwork:
    text = entry.strip()
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        pass
    name = _normal_host(text)
    if not _HOST_NAME.fullmatch(name):
        raise ValueError(f"{entry!r} is neither a host name (images.example.com, *.example.com) nor an IP "
                         "network (10.0.0.0/8, 127.0.0.1, ::1)")
    return name


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _normal_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


def address_refusal(address: IPAddress) -> str | None:
    """Why `address` is not a public one (None when it is), following embedded IPv4 in IPv6 forms."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        for inner in embedded:
            reason = address_refusal(inner)
            if reason:
                return f"{reason} ({inner}, embedded in IPv6 {address})"
        if embedded:
            return None  # the host talks to the public IPv4 address it carries
    checks = (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
    )
    for attribute, reason in checks:
        if getattr(address, attribute):
            return reason
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "a carrier-grade NAT address (100.64.0.0/10)"
    if isinstance(address, ipaddress.IPv6Address):
        if address in _UNIQUE_LOCAL:
            return "a unique-local address (fc00::/7)"
        if address.is_site_local:
            return "a site-local address (fec0::/10)"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "not a globally routable address"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 form carries and that a connection may end up reaching: IPv4-mapped
    (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d), 6to4 (2002::/16), Teredo's server and client (2001::/32)
    and NAT64 (64:ff9b::/96, 64:ff9b:1::/48)."""
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address.teredo is not None:
        return address.teredo
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if any(address in net for net in _NAT64) or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    return ()


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``getaddrinfo`` gives for `host` (it also reads 0x7f000001, 2130706433 and 127.1 as
    127.0.0.1, so every spelling of an address is vetted as the address it is)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# ------------------------------------------------------------------------------------------ deadline

_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("isal_download_deadline", default=None)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bound every socket operation of the downloads made inside the block (this thread/context) to end
    `seconds` from now."""
    token = _DEADLINE.set((time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def deadline_left() -> float | None:
    """Seconds left before the current deadline (<= 0 once it passed); None outside :func:`deadline`."""
    current = _DEADLINE.get()
    return None if current is None else current[0] - time.monotonic()


def _bounded(timeout: float | None, error: type[Exception]) -> float | None:
    current = _DEADLINE.get()
    if current is None:
        return timeout
    left = current[0] - time.monotonic()
    if left <= 0:
        raise error(f"the {current[1]:g} s download deadline passed")
    return left if timeout is None else min(timeout, left)


# ------------------------------------------------------------------------------------------ transport


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write is bounded by the current download's deadline."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                      _bounded(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore network backend that vets every address of a host before connecting to one of them.

    `exempt`: (host, port) pairs connected to without vetting (the backend's own Label Studio).  `resolver`
    is injectable so tests can play a rebinding DNS server without touching /etc/hosts.
    """

    def __init__(self, policy: DownloadPolicy, exempt: Iterable[tuple[str, int]] = (),
                 resolver: Resolver = system_resolver) -> None:
        self.policy = policy
        self.exempt = frozenset((_normal_host(h), int(p)) for h, p in exempt)
        self.resolver = resolver
        self._plain = httpcore.SyncBackend()

    def vet(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for `host`; raises FetchRefused when any of them is not public."""
        name = _normal_host(host).strip("[]")
        if not self.policy.ssrf_protection or (name, port) in self.exempt or self.policy.host_allowed(name):
            return [host]  # connect by name: nothing to vet
        try:
            addresses = list(self.resolver(name, port))
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"host {name} could not be resolved: {exc}") from None
        if not addresses:
            raise httpcore.ConnectError(f"host {name} resolved to no address")
        networks = self.policy.networks()
        for text in addresses:
            try:
                address = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                raise FetchRefused(name, f"resolved to {text!r}, which is not an IP address") from None
            if any(address in net for net in networks):
                continue
            reason = address_refusal(address)
            if reason:
                shown = "is" if _literal(name) == address else f"resolves to {address},"
                raise FetchRefused(name, f"{shown} {reason}: {_HOW_TO_ALLOW}")
        return addresses

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        addresses = self.vet(host, port)
        last: Exception | None = None
        for address in addresses:
            try:
                stream = self._plain.connect_tcp(address, port, _bounded(timeout, httpcore.ConnectTimeout),
                                                 local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
                continue
            return _DeadlineStream(stream)
        assert last is not None
        raise last

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise FetchRefused("(unix socket)", "is not an image host")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx transport whose connections all go through a :class:`GuardedBackend` (and never a proxy)."""

    def __init__(self, backend: GuardedBackend, limits: httpx.Limits | None = None) -> None:
        super().__init__(trust_env=False)
        limits = limits or httpx.Limits(max_connections=32, max_keepalive_connections=8)
        # Replaces the pool HTTPTransport built: the same options, plus our network backend.  The SSL context
        # still honours SSL_CERT_FILE/SSL_CERT_DIR (trust_env here only means certificates, not proxies).
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=True),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )
        self.backend = backend


def image_client(policy: DownloadPolicy, exempt: Iterable[tuple[str, int]] = (), timeout: float = 30.0,
                 resolver: Resolver = system_resolver) -> httpx.Client:
    """The httpx client that downloads task images: guarded connections, redirects followed (each hop through
    the guard; httpx drops Authorization on a hop to another origin), no environment proxy."""
    transport = GuardedTransport(GuardedBackend(policy, exempt, resolver))
    return httpx.Client(transport=transport, timeout=timeout, follow_redirects=True, max_redirects=5,
                        trust_env=False)


__all__ = [
    "DownloadPolicy",
    "FetchRefused",
    "GuardedBackend",
    "GuardedTransport",
    "address_refusal",
    "deadline",
    "deadline_left",
    "image_client",
    "parse_allowed_entry",
    "system_resolver",
]
