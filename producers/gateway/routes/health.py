"""Liveness and broker reachability, without auth, answered within HEALTH_BUDGET_S whatever Redis does."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from producers.gateway.deps import State
from producers.gateway.errors import broker_unavailable

router = APIRouter(tags=["health"])
HEALTH_BUDGET_S = 0.05


@router.get("/healthz")
async def healthz(state: State) -> dict[str, str]:
    try:
        await asyncio.wait_for(state.redis.ping(), HEALTH_BUDGET_S)
    except TimeoutError:
        raise broker_unavailable(f"no PING reply within {HEALTH_BUDGET_S * 1000:.0f} ms") from None
    return {"status": "ok"}
