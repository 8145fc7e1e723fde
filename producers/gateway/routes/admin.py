"""Operator views: queue depths and the dead-letter queue (admin role)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query

from producers.gateway.deps import Admin, State
from producers.gateway.routes.tasks import ERRORS
from shared import fairqueue, registry
from shared.dlq import DLQ_KEY, decode_entry

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=ERRORS)


@router.get("/queues")
async def queues(state: State, who: Admin) -> dict[str, Any]:
    """Depth of every (model, priority) queue, and per model its depths and the live workers serving it."""
    declared = state.settings.all_queues()
    depths = await fairqueue.queue_depth_async(state.redis, *(name for name, _, _ in declared))
    pipe = state.redis.pipeline(transaction=False)
    for model in state.settings.models:
        pipe.zrangebyscore(registry.key(state.settings, model.name), time.time(), "+inf")
    workers = await pipe.execute()
    models: dict[str, dict[str, Any]] = {m.name: {"workers": sorted(x.decode() if isinstance(x, bytes) else x for x in w)} for m, w in zip(state.settings.models, workers, strict=True)}
    for (_, priority, model), depth in zip(declared, depths, strict=True):
        models[model][str(priority)] = int(depth)
    return {"queues": {name: int(depth) for (name, _, _), depth in zip(declared, depths, strict=True)}, "models": models}


@router.get("/dlq")
async def dlq(state: State, who: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    # The asyncio pool, never the synchronous DLQ client: its retries would stall every request.
    return [decode_entry(raw) for raw in await state.redis.lrange(DLQ_KEY, 0, limit - 1)]
