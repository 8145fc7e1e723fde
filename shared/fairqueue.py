"""Fair share between tenants inside a priority: a bulk queue is one list per tenant, served round-robin.

Why: bulk was one FIFO list per model, so a tenant's million-line backfill occupied it for hours and
another tenant's 100-line batch waited behind all of it. Now a message published to a *fair* queue
(every bulk queue, ``Settings.fair_queues``) goes to its tenant's own list, and the tenant joins the
queue's rotation; a worker's fetch (workers/consumer/transport.py) takes one message from the tenant at the
head of the rotation and moves that tenant to the back. A tenant with one task waits behind at most
one message of each other tenant with work queued (plus what workers already hold: at most their
threads), whatever their backlogs.

Keys, for a queue ``Q`` (all in the broker's Redis):
    ``Q``                 kombu's own list: messages restored after a worker died (served first)
    ``Q:tenant:<t>``      tenant t's messages, FIFO (LPUSH here, RPOP by the fetch)
    ``Q:tenants``         the rotation (a list of tenants with messages queued)
    ``Q:tenant-set``      the same tenants as a set (to join the rotation once)

A message's tenant is the ``autoglm-tenant`` header the producer sets from the request (none: ``_``,
one shared share for callers that name no tenant). Publishing is one Lua script (push, and join
the rotation if not in it), so a fetch never sees a tenant in the rotation without its list, or the
reverse, for longer than one script. Producers and workers both publish through this channel
(kombu's Redis transport with ``_put`` replaced); ``queue_depth`` counts a fair queue whole.

Every publish of a task (any queue) also sets the task's *submitted* marker (shared/broker.py,
``submitted_key``) in the same round trip, kept ``broker.result_expires_s``: Celery reports a queued
task and an id it never saw alike (PENDING); the marker tells them apart (``TaskHandle.status``).
"""

from __future__ import annotations

from typing import Any

from kombu.exceptions import BatchPublishError
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from shared.broker import replicated, run_script, submitted_key
from shared.schemas import ANONYMOUS_TENANT

TENANT_HEADER = "autoglm-tenant"

# KEYS: tenant list, tenant set, rotation, the task's submitted marker (optional). ARGV: message,
# tenant, the marker's ttl in seconds.
PUT = """
redis.call('LPUSH', KEYS[1], ARGV[1])
if redis.call('SADD', KEYS[2], ARGV[2]) == 1 then redis.call('RPUSH', KEYS[3], ARGV[2]) end
if KEYS[4] then redis.call('SET', KEYS[4], '1', 'EX', ARGV[3]) end
return 1
"""

# A plain (not fair) queue's publish with the task's submitted marker: one command, one reply (a
# redis-py pipeline of LPUSH + SET cost a third more per submit). KEYS: the list, the marker.
# ARGV: message, the marker's ttl in seconds.
PUT_PLAIN = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return 1
"""

# KEYS: the queue. Messages waiting in it, all tenants together.
DEPTH = """
local total = redis.call('LLEN', KEYS[1])
for _, tenant in ipairs(redis.call('SMEMBERS', KEYS[1] .. ':tenant-set')) do
  total = total + redis.call('LLEN', KEYS[1] .. ':tenant:' .. tenant)
end
return total
"""

# The fetch's pop from a fair queue (a Lua function the fetch script includes): restored messages
# first, then the tenant at the head of the rotation, which goes to the back. A tenant whose list
# is empty leaves the rotation.
POP_FAIR = """
local function pop_fair(q)
  local item = redis.call('RPOP', q)
  if item then return item end
  local rotation, members = q .. ':tenants', q .. ':tenant-set'
  for _ = 1, redis.call('LLEN', rotation) do
    local tenant = redis.call('LMOVE', rotation, rotation, 'LEFT', 'RIGHT')
    if not tenant then return false end
    item = redis.call('RPOP', q .. ':tenant:' .. tenant)
    if item then return item end
    redis.call('LREM', rotation, 0, tenant)
    redis.call('SREM', members, tenant)
  end
  return false
end
"""


def tenant_key(queue: str, tenant: str) -> str:
    return f"{queue}:tenant:{tenant}"


def members_key(queue: str) -> str:
    return f"{queue}:tenant-set"


def rotation_key(queue: str) -> str:
    return f"{queue}:tenants"


def put_keys(queue: str, tenant: str) -> list[str]:
    return [tenant_key(queue, tenant), members_key(queue), rotation_key(queue)]


def message_tenant(message: dict[str, Any]) -> str:
    headers = message.get("headers") if isinstance(message.get("headers"), dict) else {}
    tenant = headers.get(TENANT_HEADER)
    return tenant if isinstance(tenant, str) and tenant and ":" not in tenant else ANONYMOUS_TENANT


def queue_depth(client: Any, *queues: str) -> int:
    """Messages waiting in these queues together, fair or not (a plain list counts as itself)."""
    if not queues:
        return 0
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.eval(DEPTH, 1, queue)
    return sum(int(n) for n in pipe.execute())


def purge(client: Any, queue: str) -> int:
    """Delete every message waiting in ``queue``, all tenants'; returns how many there were."""
    tenants = [t.decode() if isinstance(t, bytes) else t for t in client.smembers(members_key(queue))]
    size = queue_depth(client, queue)
    client.delete(queue, rotation_key(queue), members_key(queue), *(tenant_key(queue, t) for t in tenants))
    return size


async def queue_depth_async(client: Any, *queues: str) -> list[int]:
    """Each queue's depth (an asyncio Redis client's pipeline)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.eval(DEPTH, 1, queue)
    return [int(n) for n in await pipe.execute()]


def message_task_id(message: dict[str, Any]) -> str | None:
    """The Celery task id a kombu message carries (protocol 2 header; None for other messages)."""
    headers = message.get("headers") if isinstance(message.get("headers"), dict) else {}
    task_id = headers.get("id")
    return task_id if isinstance(task_id, str) and task_id else None


class DurablePublishBatch(kombu_redis.PublishBatch):
    """kombu's pipelined publish batch (``producer.batch()``), each flush ending with WAIT: the
    batch's messages count as published once the channel's ``min_replicas_acked`` replicas have them."""

    def flush(self) -> None:  # kombu's flush, with the pipeline run through ``replicated``
        self._check_usable()
        if not self._buffered:
            return
        try:
            replicated(self.pipeline, self.channel.min_replicas_acked, self.channel.replica_ack_timeout_s)
        except BaseException as exc:
            self._failed, self._buffered = exc, 0
            self.pipeline.reset()
            if isinstance(exc, Exception):
                raise BatchPublishError("Redis publish batch failed or was not replicated; delivery is uncertain") from exc
            raise
        self._buffered = 0


class Channel(kombu_redis.Channel):
    #: queues whose messages are kept per tenant and served round-robin (the bulk queues)
    fair_queues: tuple[str, ...] = ()
    #: how long a task's submitted marker lives (the result's lifetime: broker.result_expires_s)
    submitted_ttl_s: int = 86_400
    #: replicas that must confirm a publish (WAIT) before it returns; 0: none (broker.min_replicas_acked)
    min_replicas_acked: int = 0
    replica_ack_timeout_s: float = 1.0
    from_transport_options = kombu_redis.Channel.from_transport_options + (
        "fair_queues", "submitted_ttl_s", "min_replicas_acked", "replica_ack_timeout_s")

    _put_script: Any = None
    _put_plain_script: Any = None

    def _script(self, client: Any) -> Any:
        """The publish script, sent by its SHA (redis-py loads it where the server lacks it)."""
        if self._put_script is None:
            self._put_script = client.register_script(PUT)
        return self._put_script

    def _plain_script(self, client: Any) -> Any:
        if self._put_plain_script is None:
            self._put_plain_script = client.register_script(PUT_PLAIN)
        return self._put_plain_script

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        task_id = message_task_id(message)
        marker, ttl = (submitted_key(task_id) if task_id else None), int(self.submitted_ttl_s)
        if queue not in self.fair_queues:
            self._put_plain(queue, message, marker, ttl, **kwargs)
            return
        tenant = message_tenant(message)
        keys, args = put_keys(queue, tenant) + ([marker] if marker else []), [dumps(message), tenant, ttl]
        self._eval(self._script, keys, args, kwargs.pop("_publish_batch", None))

    def _eval(self, script_for: Any, keys: list[str], args: list[Any], publish_batch: Any) -> None:
        """Run a publish script now, or add it to kombu's pipelined batch (FleetClient.submit_many)."""
        if publish_batch is not None:
            script = script_for(publish_batch.pipeline)
            publish_batch.pipeline.scripts.add(script)  # the pipeline loads it first if the server lacks it
            publish_batch.add("evalsha", script.sha, len(keys), *keys, *args)
            return
        with self.conn_or_acquire() as client:
            run_script(script_for(client), keys, args, client, self.min_replicas_acked, self.replica_ack_timeout_s)

    def create_publish_batch(self, max_size: int) -> Any:
        if not self.min_replicas_acked:
            return super().create_publish_batch(max_size)
        return DurablePublishBatch(self, max_size)

    def _put_plain(self, queue: str, message: dict[str, Any], marker: str | None, ttl: int, **kwargs: Any) -> None:
        """kombu's LPUSH, with the marker set by the same command (a script)."""
        if marker is None or (self._expires and queue in self._expires):  # kombu's own path, as before
            super()._put(queue, message, **kwargs)
            if marker is not None:
                with self.conn_or_acquire() as client:
                    client.set(marker, 1, ex=ttl)
            return
        keys = [self._q_for_pri(queue, self._get_message_priority(message, reverse=False)), marker]
        self._eval(self._plain_script, keys, [dumps(message), ttl], kwargs.pop("_publish_batch", None))

    def _purge(self, queue: str) -> int:
        if queue not in self.fair_queues:
            return super()._purge(queue)
        with self.conn_or_acquire() as client:
            return purge(client, queue)

    def _size(self, queue: str) -> int:
        if queue not in self.fair_queues:
            return super()._size(queue)
        with self.conn_or_acquire() as client:
            return queue_depth(client, queue)


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same channel reached through Redis Sentinel (kombu's SentinelChannel finds the master)."""

    from_transport_options = tuple(dict.fromkeys(Channel.from_transport_options
                                                 + kombu_redis.SentinelChannel.from_transport_options))


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
