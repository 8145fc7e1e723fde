"""JWT bearer tokens for the gateway: tenant and role claims, HS256 or RS256 keys from config."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

import jwt

from shared.config import GatewayConfig
from shared.errors import ErrorCode, FleetError


class Role(StrEnum):
    GUEST = "guest"  # health only
    USER = "user"  # submit, read and cancel its own tenant's tasks
    ADMIN = "admin"  # any task, DLQ, queue stats


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: Role
    subject: str


def _verification_keys(config: GatewayConfig) -> list[tuple[str, str]]:
    keys = []
    if config.jwt_secret:
        keys.append(("HS256", config.jwt_secret))
    if config.jwt_public_key:
        keys.append(("RS256", config.jwt_public_key.read_text()))
    if not keys:
        raise FleetError(ErrorCode.INTERNAL, "gateway has no JWT key: set gateway.jwt_secret or gateway.jwt_public_key")
    return keys


def verify(token: str, config: GatewayConfig) -> Principal:
    """The token's principal, or UNAUTHENTICATED (expired, forged, wrong audience, bad claims)."""
    try:
        algorithm = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError as exc:
        raise FleetError(ErrorCode.UNAUTHENTICATED, f"malformed token: {exc}") from None
    for alg, key in _verification_keys(config):
        if alg != algorithm:
            continue
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=config.jwt_audience, issuer=config.jwt_issuer,
                                options={"require": ["exp", "sub", "tenant", "role"]})
        except jwt.ExpiredSignatureError:
            raise FleetError(ErrorCode.UNAUTHENTICATED, "token expired; issue a new one") from None
        except jwt.PyJWTError as exc:
            raise FleetError(ErrorCode.UNAUTHENTICATED, f"invalid token: {exc}") from None
        try:
            return Principal(tenant=str(claims["tenant"]), role=Role(claims["role"]), subject=str(claims["sub"]))
        except ValueError:
            raise FleetError(ErrorCode.UNAUTHENTICATED, f"unknown role {claims['role']!r}") from None
    raise FleetError(ErrorCode.UNAUTHENTICATED, f"token algorithm {algorithm!r} is not accepted here")


def issue(config: GatewayConfig, tenant: str, role: Role, ttl_s: int = 3600, subject: str | None = None,
          algorithm: str | None = None) -> str:
    now = int(time.time())
    claims = {"sub": subject or f"{tenant}-{role}", "tenant": tenant, "role": str(role), "iat": now, "exp": now + ttl_s,
              "iss": config.jwt_issuer, "aud": config.jwt_audience, "jti": uuid.uuid4().hex}
    algorithm = algorithm or ("HS256" if config.jwt_secret else "RS256")
    if algorithm == "HS256":
        if not config.jwt_secret:
            raise FleetError(ErrorCode.INTERNAL, "HS256 needs gateway.jwt_secret")
        return jwt.encode(claims, config.jwt_secret, algorithm="HS256")
    if not config.jwt_private_key:
        raise FleetError(ErrorCode.INTERNAL, "RS256 needs gateway.jwt_private_key")
    return jwt.encode(claims, config.jwt_private_key.read_text(), algorithm="RS256")
