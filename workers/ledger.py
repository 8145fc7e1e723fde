"""Per-task bookkeeping in Redis that makes redelivery safe.

- deliveries: how many times a message with this task id reached a worker (a message that keeps
  killing workers is dead-lettered after ``broker.max_deliveries``);
- holder: the delivery tag of the message now running the task. A second delivery of the same task
  id while the holder's message is still unacked (a producer re-published it, or a consumer restart
  put it back) does not run the task a second time: only one delivery runs, the others stand down.
  When the holder's worker dies its message is restored to the queue (it leaves ``unacked``), so
  the claim lapses by itself;
- result + executions: the answer is recorded together with the execution count in one
  transaction, so a redelivery after the answer was recorded returns it instead of running again,
  and ``executions`` counts answers computed (tests assert exactly once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from kombu.transport.redis import Channel as RedisChannel

from shared.broker import redis_client

PREFIX = "autoglm:task"
UNACKED_KEY = RedisChannel.unacked_key  # kombu's hash of messages delivered but not yet acked

CLAIM = """
redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
local deliveries = tonumber(redis.call('HGET', KEYS[1], 'deliveries'))
local result = redis.call('HGET', KEYS[1], 'result')
if result then return {deliveries, 'done', result} end
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder and holder ~= ARGV[1] and redis.call('HEXISTS', KEYS[2], holder) == 1 then
  return {deliveries, 'busy', holder}
end
redis.call('HSET', KEYS[1], 'holder', ARGV[1])
return {deliveries, 'mine', ''}
"""


@dataclass(frozen=True)
class Claim:
    deliveries: int
    outcome: Literal["mine", "done", "busy"]
    result: dict[str, Any] | None = None


class Ledger:
    def __init__(self, redis_url: str, ttl_s: int) -> None:
        self.client = redis_client(redis_url)
        self.ttl_s = ttl_s
        self._claim = self.client.register_script(CLAIM)

    def claim(self, task_id: str, delivery_tag: str) -> Claim:
        """Count this delivery and decide who runs the task: this delivery ("mine"), nobody because
        its answer is recorded ("done", with the result), or another live delivery ("busy")."""
        deliveries, outcome, result = self._claim(keys=[f"{PREFIX}:{task_id}", UNACKED_KEY],
                                                  args=[delivery_tag or "", self.ttl_s])
        return Claim(int(deliveries), outcome, json.loads(result) if outcome == "done" else None)

    def record(self, task_id: str, result: dict[str, Any]) -> None:
        """The task's answer and one more execution, in one transaction."""
        key = f"{PREFIX}:{task_id}"
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(key, "executions", 1)
        pipe.hset(key, "result", json.dumps(result))
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def counts(self, task_id: str) -> dict[str, int]:
        raw = self.client.hmget(f"{PREFIX}:{task_id}", "deliveries", "executions")
        return {k: int(v) for k, v in zip(("deliveries", "executions"), raw, strict=True) if v is not None}
