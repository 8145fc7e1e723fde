"""Which workers serve which models right now: a Redis sorted set per model, renewed by heartbeat.

Why: queues are per (model, priority), so a request for a model that no worker has loaded would
wait in its queue until one starts. The producer asks here before routing: when nobody serves the
requested model but a model in its ``fallbacks`` chain is served, the request goes to that model's
queue and the worker there answers it as a fallback (``result.fallback_from``). When nobody serves
either, the request still goes to its own queue: accepted work waits for a worker, never vanishes.

Each entry is ``worker -> expiry`` (epoch seconds): a worker that dies stops renewing and drops out
after ``ttl_s`` without anyone cleaning up. Keys are per model *queue*, ``autoglm:serving:<model's
interactive queue>``, so two fleets sharing one Redis under other queue names do not see each other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import redis

from shared.config import Settings


def key(settings: Settings, model: str) -> str:
    return f"autoglm:serving:{settings.queue_name(settings.queue_classes()[0].priority, model)}"


class Registry:
    def __init__(self, client: redis.Redis, settings: Settings, cache_s: float = 1.0) -> None:
        self.client = client
        self.settings = settings
        self.cache_s = cache_s
        self._cached: dict[str, tuple[float, list[str]]] = {}
        self._lock = threading.Lock()

    # -- worker side -----------------------------------------------------------------------------
    def announce(self, worker: str, models: Iterable[str], ttl_s: float) -> None:
        expiry = time.time() + ttl_s
        pipe = self.client.pipeline(transaction=False)
        for model in models:
            pipe.zadd(key(self.settings, model), {worker: expiry})
        pipe.execute()

    def withdraw(self, worker: str, models: Iterable[str]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for model in models:
            pipe.zrem(key(self.settings, model), worker)
        pipe.execute()

    # -- producer side ---------------------------------------------------------------------------
    def workers(self, model: str) -> list[str]:
        """Live workers serving ``model`` (cached for ``cache_s``: routing must not add a round trip
        per request at thousands of submissions per second)."""
        now = time.monotonic()
        with self._lock:
            hit = self._cached.get(model)
            if hit is not None and now - hit[0] < self.cache_s:
                return hit[1]
        live = [w.decode() if isinstance(w, bytes) else w
                for w in self.client.zrangebyscore(key(self.settings, model), time.time(), "+inf")]
        with self._lock:
            self._cached[model] = (now, live)
        return live

    def route(self, model: str, fallbacks: list[str]) -> str:
        """The model whose queue a request for ``model`` goes to."""
        if not fallbacks or self.workers(model):
            return model
        for fallback in fallbacks:
            if self.workers(fallback):
                return fallback
        return model
