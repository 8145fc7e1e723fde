"""Completion webhooks: a request's ``callback_url`` is POSTed the task's outcome once it is done.

Signed so a receiver can trust it: ``X-AutoGLM-Timestamp`` (epoch seconds) and
``X-AutoGLM-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" under webhooks.secret>``;
``X-AutoGLM-Task-Id`` lets a receiver drop a repeat (delivery is at least once: a worker killed
mid-delivery delivers again). ``verify`` below is what a receiver in Python runs.

Server-side request forgery: a callback URL may not resolve to a loopback, link-local, multicast or
unspecified address (the gateway's own host, cloud metadata endpoints...) unless its host is in
``webhooks.allowed_hosts``. Checked when the request is submitted and again before each delivery
(DNS can change in between).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from urllib.parse import urlsplit

from shared.errors import ErrorCode, FleetError

SIGNATURE = "X-AutoGLM-Signature"
TIMESTAMP = "X-AutoGLM-Timestamp"
TASK_ID = "X-AutoGLM-Task-Id"
OUTCOME_KEY = "autoglm:callback:{task_id}"


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


def _refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None


def check_url(url: str, allowed_hosts: list[str]) -> str:
    """``url`` when it may be called back; INVALID_INPUT naming why not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FleetError(ErrorCode.INVALID_INPUT, "callback_url: must be an http(s) URL with a host")
    host = parts.hostname
    if host in allowed_hosts:
        return url
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FleetError(ErrorCode.INVALID_INPUT, f"callback_url: host {host!r} does not resolve ({exc})") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if address.compressed in allowed_hosts:
            continue
        why = _refused(address)
        if why:
            raise FleetError(ErrorCode.INVALID_INPUT, f"callback_url: {host!r} resolves to {address} ({why}); "
                             "such targets are refused unless listed in webhooks.allowed_hosts")
    return url
