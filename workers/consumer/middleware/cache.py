"""Opt-in result cache: an identical deterministic request is answered from Redis (cached=true).

``ResultCache`` is the store (one per consumer, in its runtime); ``ResultCaching`` the middleware
that reads it before a task runs and fills it after."""

from __future__ import annotations

from typing import Any

from shared.broker import redis_client
from shared.schemas import TaskResult
from workers.consumer import metrics
from workers.consumer.middleware.job import Job, Middleware


class ResultCache:
    def __init__(self, redis_url: str, ttl_s: int, master_name: str | None = None) -> None:
        self.client = redis_client(redis_url, master_name=master_name)
        self.ttl_s = ttl_s

    def get(self, key: str) -> TaskResult | None:
        raw = self.client.get(key)
        return None if raw is None else TaskResult.model_validate_json(raw).model_copy(update={"cached": True})

    def put(self, key: str, result: TaskResult) -> None:
        self.client.set(key, result.model_dump_json(), ex=self.ttl_s)


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
