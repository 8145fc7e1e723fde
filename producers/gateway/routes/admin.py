"""Operator views: queue depths and the dead-letter queue (admin role)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from producers.gateway.deps import Admin, State
from producers.gateway.routes.tasks import ERRORS
from shared.dlq import DLQ_KEY, decode_entry

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=ERRORS)


@router.get("/queues")
async def queues(state: State, who: Admin) -> dict[str, int]:
    return {q.name: int(await state.redis.llen(q.name)) for q in state.settings.queues.values()}


@router.get("/dlq")
async def dlq(state: State, who: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    # The asyncio pool, never the synchronous DLQ client: its retries would stall every request.
    return [decode_entry(raw) for raw in await state.redis.lrange(DLQ_KEY, 0, limit - 1)]
