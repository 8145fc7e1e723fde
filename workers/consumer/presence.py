"""A worker tells the fleet which models it serves (shared/registry.py), for as long as it lives.

The first consumer (the engine core's owner) renews the entry every ``broker.heartbeat_s``; it
expires three beats after the last renewal, so a killed worker drops out by itself and producers
stop routing fallbacks to it. A warm shutdown withdraws it at once.
"""

from __future__ import annotations

import logging
import threading

from redis.exceptions import RedisError

from shared.broker import redis_client
from shared.config import Settings
from shared.registry import Registry

log = logging.getLogger(__name__)


class Presence:
    def __init__(self, settings: Settings, worker: str, models: list[str]) -> None:
        self.registry = Registry(redis_client(settings.redis_url or "", outage_s=0, timeout_s=2.0,
                                              master_name=settings.broker.master_name), settings)
        self.worker, self.models, self.interval_s = worker, models, settings.broker.heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="presence", daemon=True)

    def start(self) -> Presence:
        self._thread.start()
        return self

    def _beat(self) -> None:
        while True:
            try:
                self.registry.announce(self.worker, self.models, ttl_s=3 * self.interval_s)
            except RedisError:  # the broker is away: the next beat tries again
                log.debug("presence renewal failed", exc_info=True)
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        try:
            self.registry.withdraw(self.worker, self.models)
        except RedisError:
            pass  # it expires by itself
        self.registry.client.close()
