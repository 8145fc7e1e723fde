"""What the gateway's routes share, typed, built once per app in its lifespan."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from fastapi import Request

from producers.aio import AsyncFleetClient
from producers.ratelimit import RateLimiter
from shared.config import Settings


@dataclass
class GatewayState:
    settings: Settings
    fleet: AsyncFleetClient
    redis: aioredis.Redis  # the fleet's pool: owner keys, rate-limit buckets, DLQ reads
    limiter: RateLimiter
    started_at: float = field(default_factory=time.time)  # `created` of /v1/models entries


def gateway_state(request: Request) -> GatewayState:
    """FastAPI dependency: the app's state (set by the lifespan in app.py)."""
    return request.app.state.gateway
