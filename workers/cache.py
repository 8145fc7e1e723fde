"""Opt-in result cache: identical deterministic requests answered once, then from Redis."""

from __future__ import annotations

from shared.broker import redis_client
from shared.schemas import TaskResult


class ResultCache:
    def __init__(self, redis_url: str, ttl_s: int) -> None:
        self.client = redis_client(redis_url)
        self.ttl_s = ttl_s

    def get(self, key: str) -> TaskResult | None:
        raw = self.client.get(key)
        return None if raw is None else TaskResult.model_validate_json(raw).model_copy(update={"cached": True})

    def put(self, key: str, result: TaskResult) -> None:
        self.client.set(key, result.model_dump_json(), ex=self.ttl_s)
