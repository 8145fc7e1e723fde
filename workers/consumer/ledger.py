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

from shared.broker import redis_client, run_script

PREFIX = "autoglm:task"
UNACKED_KEY = RedisChannel.unacked_key  # kombu's hash of messages delivered but not yet acked

# Celery's result key gets a state only if it does not hold SUCCESS yet (Celery's own rule: a
# late duplicate must never overwrite a success), then a PUBLISH for callers waiting on pub/sub.
STORE_STATE = """
local function store_state(key, value, expires)
  local current = redis.call('GET', key)
  if current then
    local ok, meta = pcall(cjson.decode, current)
    if ok and type(meta) == 'table' and meta.status == 'SUCCESS' then return end
  end
  redis.call('SETEX', key, expires, value)
  redis.call('PUBLISH', key, value)
end
"""
# KEYS: ledger hash, kombu's unacked hash, Celery's result key. ARGV: delivery tag, ledger ttl,
# the STARTED state to store when this delivery runs the task, result ttl.
CLAIM = STORE_STATE + """
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
store_state(KEYS[3], ARGV[3], ARGV[4])
return {deliveries, 'mine', ''}
"""
# KEYS: ledger hash, Celery's result key. ARGV: answer json, ledger ttl, SUCCESS state, result ttl,
# 1 when the model computed this answer now (0: it came from the cache or the ledger), the delivery
# tag. A delivery's record sent again (its first reply was lost with a failed master, and the client
# retried it on the new one) is not a second execution: the hash keeps who recorded.
RECORD = STORE_STATE + """
if ARGV[5] == '1' and not (ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'recorded_by') == ARGV[6]) then
  redis.call('HINCRBY', KEYS[1], 'executions', 1)
  redis.call('HSET', KEYS[1], 'result', ARGV[1], 'recorded_by', ARGV[6])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
store_state(KEYS[2], ARGV[3], ARGV[4])
"""


@dataclass(frozen=True)
class StoredState:
    """A Celery result-backend write: key, encoded meta, expiry (see workers/consumer/tasks.py)."""

    key: str
    value: str
    expires_s: int


@dataclass(frozen=True)
class Claim:
    deliveries: int
    outcome: Literal["mine", "done", "busy"]
    result: dict[str, Any] | None = None


class Ledger:
    """``min_replicas_acked``: a recorded answer returns only once that many replicas have it (Redis
    WAIT; NotReplicated otherwise), so an answer the fleet acked survives the master's loss."""

    def __init__(self, redis_url: str, ttl_s: int, master_name: str | None = None, min_replicas_acked: int = 0,
                 replica_ack_timeout_s: float = 1.0) -> None:
        self.client = redis_client(redis_url, master_name=master_name)
        self.ttl_s = ttl_s
        self.min_replicas_acked, self.replica_ack_timeout_s = min_replicas_acked, replica_ack_timeout_s
        self._claim = self.client.register_script(CLAIM)
        self._record = self.client.register_script(RECORD)

    def claim(self, task_id: str, delivery_tag: str, started: StoredState) -> Claim:
        """Count this delivery and decide who runs the task: this delivery ("mine", and the task's
        STARTED state is stored in the same step), nobody because its answer is recorded ("done",
        with the result), or another live delivery ("busy"). One round trip."""
        deliveries, outcome, result = self._claim(
            keys=[f"{PREFIX}:{task_id}", UNACKED_KEY, started.key],
            args=[delivery_tag or "", self.ttl_s, started.value, started.expires_s])
        return Claim(int(deliveries), outcome, json.loads(result) if outcome == "done" else None)

    def record(self, task_id: str, result: dict[str, Any], success: StoredState, executed: bool = True,
               delivery_tag: str = "") -> None:
        """The task's answer, one more execution (when ``executed``) and its SUCCESS state, in one
        atomic step: a redelivery finds either all of it or none. One round trip (WAIT included)."""
        keys = [f"{PREFIX}:{task_id}", success.key]
        args = [json.dumps(result), self.ttl_s, success.value, success.expires_s, int(executed), delivery_tag or ""]
        run_script(self._record, keys, args, self.client, self.min_replicas_acked, self.replica_ack_timeout_s)

    def counts(self, task_id: str) -> dict[str, int]:
        raw = self.client.hmget(f"{PREFIX}:{task_id}", "deliveries", "executions")
        return {k: int(v) for k, v in zip(("deliveries", "executions"), raw, strict=True) if v is not None}
