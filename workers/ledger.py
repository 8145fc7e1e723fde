"""Per-task bookkeeping in Redis that makes redelivery safe.

- deliveries: how many times a message reached a worker (a message that keeps killing workers is
  dead-lettered after ``broker.max_deliveries``);
- executions: how many times the model actually answered it (tests assert exactly once);
- the stored result: a redelivered task whose result is already SUCCESS is not run again, so a
  caller sees one result however often the message was delivered.
"""

from __future__ import annotations

from shared.broker import redis_client

PREFIX = "autoglm:task"


class Ledger:
    def __init__(self, redis_url: str, ttl_s: int) -> None:
        self.client = redis_client(redis_url)
        self.ttl_s = ttl_s

    def _bump(self, task_id: str, field: str) -> int:
        key = f"{PREFIX}:{task_id}"
        pipe = self.client.pipeline()
        pipe.hincrby(key, field, 1)
        pipe.expire(key, self.ttl_s)
        return int(pipe.execute()[0])

    def delivered(self, task_id: str) -> int:
        return self._bump(task_id, "deliveries")

    def executed(self, task_id: str) -> int:
        return self._bump(task_id, "executions")

    def counts(self, task_id: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.client.hgetall(f"{PREFIX}:{task_id}").items()}
