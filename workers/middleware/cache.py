"""Opt-in result cache: an identical deterministic request is answered from Redis (cached=true)."""

from __future__ import annotations

from typing import Any

from shared.schemas import TaskResult
from workers import metrics
from workers.middleware.base import Job, Middleware


class ResultCaching(Middleware):
    def before_run(self, ctx: Any, job: Job) -> dict[str, Any] | None:
        key = job.request.cache_key(job.engine.name)
        hit = ctx.cache.get(key) if key else None
        if hit is None:
            return None
        metrics.TASKS.labels(str(job.task_type), "cache_hit", "").inc()
        return hit.model_copy(update={"worker": job.task.request.hostname or ""}).model_dump(mode="json")

    def after_success(self, ctx: Any, job: Job, result: dict[str, Any]) -> None:
        key = job.request.cache_key(job.engine.name) if job.executed else None
        if key:
            ctx.cache.put(key, TaskResult.parse(result))
