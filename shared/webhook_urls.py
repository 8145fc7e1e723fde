"""Completion webhooks: a request's ``callback_url`` is POSTed the task's outcome once it is done.

Signed so a receiver can trust it: ``X-AutoGLM-Timestamp`` (epoch seconds) and
``X-AutoGLM-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" under webhooks.secret>``;
``X-AutoGLM-Task-Id`` lets a receiver drop a repeat (delivery is at least once: a worker killed
mid-delivery delivers again). ``verify`` below is what a receiver in Python runs.

Server-side request forgery (docs/security.md): a callback URL may only reach a *public* address.
Every address that is not globally routable is refused: loopback, private (10/8, 172.16/12,
192.168/16, ULA fc00::/7), shared/CGNAT (100.64/10), benchmarking (198.18/15), link-local (cloud
metadata), multicast, reserved, unspecified, and the same addresses written inside IPv6
(IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4, Teredo). ``webhooks.allowed_hosts``
(names or addresses) is the one escape hatch. The name is resolved once per check, on a small
executor of its own with a deadline (a resolver that never answers costs that deadline, never a
shared thread), and delivery connects to the address that was checked (``Target``), sending the
name as Host header and TLS SNI: DNS cannot rebind between the check and the connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from shared.errors import ErrorCode, FleetError

SIGNATURE = "X-AutoGLM-Signature"
TIMESTAMP = "X-AutoGLM-Timestamp"
TASK_ID = "X-AutoGLM-Task-Id"
OUTCOME_KEY = "autoglm:callback:{task_id}"
DNS_TIMEOUT_S = 2.0
# Name lookups for callback URLs, and nothing else: a resolver that hangs ties up these threads, never
# asyncio's default executor or a consumer's task threads.
_DNS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="autoglm-dns")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# Special-purpose blocks (IANA registries) that are not globally reachable, named explicitly because
# ``ipaddress``'s own tables differ between Python releases.
_NOT_GLOBAL = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4", "::/128", "::1/128", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7",
    "fe80::/10", "ff00::/8"))


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(secret: str, headers: dict[str, str], body: bytes, max_age_s: float = 300.0) -> bool:
    """A receiver's check: the signature matches and the timestamp is recent (replays are refused)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        timestamp = int(lowered[TIMESTAMP.lower()])
    except (KeyError, ValueError):
        return False
    fresh = abs(time.time() - timestamp) <= max_age_s
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), lowered.get(SIGNATURE.lower(), ""))


def _embedded(address: Address) -> Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, Teredo), if any."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def refusal(address: Address) -> str | None:
    """Why a callback may not reach ``address`` (None: it is a public address)."""
    inner = _embedded(address)
    if inner is not None:
        why = refusal(inner)
        return f"{why}, inside {address}" if why else None
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    # shared/CGNAT 100.64/10 and the other special-purpose blocks
    if not address.is_global or any(address in net for net in _NOT_GLOBAL if net.version == address.version):
        return "not globally routable"
    return None


@dataclass(frozen=True)
class Target:
    """Where a callback goes: the URL as given, and the address that was checked for it."""

    url: str
    host: str
    address: str | None  # None: the host is in allowed_hosts, resolved at connect time as usual

    def pinned_url(self) -> str:
        """The URL with its host replaced by the checked address (connect there, no second lookup)."""
        if self.address is None:
            return self.url
        parts = urlsplit(self.url)
        literal = f"[{self.address}]" if ":" in self.address else self.address
        netloc = literal if parts.port is None else f"{literal}:{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))

    def host_header(self) -> str:
        parts = urlsplit(self.url)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if parts.port is None else f"{host}:{parts.port}"


def _lookup(host: str, port: int) -> list[str]:
    return [info[4][0].split("%")[0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _parse(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FleetError(ErrorCode.INVALID_INPUT, "callback_url: must be an http(s) URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FleetError(ErrorCode.INVALID_INPUT, "callback_url: the port is not a number in 1-65535") from None
    return parts.hostname, port


def _judge(url: str, host: str, addresses: list[str], allowed_hosts: list[str]) -> Target:
    if not addresses:
        raise FleetError(ErrorCode.INVALID_INPUT, f"callback_url: host {host!r} has no address")
    for text in addresses:
        address = ipaddress.ip_address(text)
        if address.compressed in allowed_hosts:
            continue
        why = refusal(address)
        if why:
            raise FleetError(ErrorCode.INVALID_INPUT, f"callback_url: {host!r} resolves to {address} ({why}); only "
                             "public addresses are called back, unless the host is listed in webhooks.allowed_hosts")
    return Target(url, host, addresses[0])


def _without_lookup(url: str, allowed_hosts: list[str]) -> tuple[str, int, Target | None]:
    """(host, port, its Target when no name lookup is needed): an allowed host, or an address literal."""
    host, port = _parse(url)
    if host in allowed_hosts:
        return host, port, Target(url, host, None)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return host, port, None
    return host, port, _judge(url, host, [literal.compressed], allowed_hosts)


def _unresolved(host: str, timeout_s: float, exc: BaseException | None) -> FleetError:
    why = f"no answer within {timeout_s:g}s" if exc is None else str(exc)
    return FleetError(ErrorCode.INVALID_INPUT, f"callback_url: host {host!r} does not resolve ({why})")


def resolve(url: str, allowed_hosts: list[str], timeout_s: float = DNS_TIMEOUT_S) -> Target:
    """The checked ``Target`` of ``url``; INVALID_INPUT naming why it may not be called back."""
    host, port, known = _without_lookup(url, allowed_hosts)
    if known is not None:
        return known
    try:
        addresses = _DNS.submit(_lookup, host, port).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise _unresolved(host, timeout_s, None) from None
    except (OSError, UnicodeError) as exc:
        raise _unresolved(host, timeout_s, exc) from None
    return _judge(url, host, addresses, allowed_hosts)


async def resolve_async(url: str, allowed_hosts: list[str], timeout_s: float = DNS_TIMEOUT_S) -> Target:
    """``resolve`` for an event loop: the lookup runs on the DNS executor, never the loop's default one."""
    host, port, known = _without_lookup(url, allowed_hosts)
    if known is not None:
        return known
    try:
        addresses = await asyncio.wait_for(asyncio.wrap_future(_DNS.submit(_lookup, host, port)), timeout_s)
    except TimeoutError:
        raise _unresolved(host, timeout_s, None) from None
    except (OSError, UnicodeError) as exc:
        raise _unresolved(host, timeout_s, exc) from None
    return _judge(url, host, addresses, allowed_hosts)
