"""kombu's Redis transport with reliable fetch, a dead-letter gate for malformed messages and a
visibility heartbeat. The worker's Celery app uses it (``broker_transport``); producers do not need it.

Why (issue: "Nothing lost, no crash loop"; celery/celery#4354):

- **Reliable fetch.** Stock kombu BRPOPs a message and *then* records it as unacked from the client:
  a worker killed in between loses the message. Here one Lua script pops the message and records it
  in kombu's own unacked hash/index in the same atomic step, so a message is always either in a queue
  or in ``unacked`` until it is acked. Redis cannot block inside a script, so when every queue is
  empty the channel waits with ``BLMOVE q q RIGHT RIGHT`` on its most urgent queue, a no-op move that
  returns the moment a message lands there (other queues are re-checked at the server's blocking
  timeout granularity, ~0.1 s).
- **Malformed messages never reach Celery.** Bytes that are not a kombu envelope (not JSON, a list,
  a string, no delivery tag) are moved to the dead-letter list by the same script, raw body kept,
  with a reason. Envelopes whose body cannot be decoded (bad base64, not JSON, not a Celery
  ``[args, kwargs, embed]`` triple, unknown task) are dead-lettered by the channel before delivery,
  and anything else that raises while Celery takes the message in is dead-lettered too: the
  consumer never restarts over a message, so in-flight tasks are never delivered twice that way.
- **Visibility heartbeat.** While a message sits in this worker its unacked score is renewed every
  ``visibility_heartbeat_s``, so ``visibility_timeout`` can be short (fast redelivery after a crash)
  without a long task being restored to the queue and run twice.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.objects import cached_property

from shared import fairqueue
from shared.broker import IN_TRANSIT_MS, in_transit_key
from shared.dlq import DLQ_KEY, encode_entry
from shared.fairqueue import POP_FAIR

log = logging.getLogger(__name__)

# KEYS: the n queue lists in the order to serve them, then unacked hash, unacked index, dead-letter
# list, then n in-transit markers (one per queue key). ARGV: now (epoch s), n, most messages to
# take, a string of n flags ('1': the queue at that position is a most urgent one, whose pops set
# its marker; '2': a fair queue, served round-robin between tenants (shared/fairqueue.py)), in-transit
# marker ttl (ms). Returns {key, message, ...}.
FETCH = POP_FAIR + """
local n, want = tonumber(ARGV[2]), tonumber(ARGV[3])
local unacked, index, dlq = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3]
local taken = {}
for i = 1, n do
  for _ = 1, 64 + want do
    if #taken >= 2 * want then return taken end
    local item
    if string.sub(ARGV[4], i, i) == '2' then item = pop_fair(KEYS[i]) else item = redis.call('RPOP', KEYS[i]) end
    if not item then break end
    local ok, msg = pcall(cjson.decode, item)
    local reason = nil
    if not ok or type(msg) ~= 'table' then
      reason = 'not a kombu envelope: the message is not a JSON object'
    elseif type(msg.properties) ~= 'table' or type(msg.properties.delivery_tag) ~= 'string'
        or msg.properties.delivery_tag == '' then
      reason = 'not a kombu envelope: properties.delivery_tag is missing'
    elseif type(msg.properties.delivery_info) ~= 'table' then
      reason = 'not a kombu envelope: properties.delivery_info is missing'
    elseif msg.headers ~= nil and type(msg.headers) ~= 'table' then
      reason = 'not a kombu envelope: headers is not an object'
    end
    if reason then
      redis.call('RPUSH', dlq, cjson.encode({
        task_id = cjson.null, task_name = cjson.null, request = cjson.null, queue = KEYS[i], raw = item,
        reason = reason, deliveries = 1, dead_at = tonumber(ARGV[1]),
        error = {code = 'INVALID_INPUT', message = reason, retryable = false}}))
    else
      local tag = msg.properties.delivery_tag
      local info = msg.properties.delivery_info
      local ex, rk = info.exchange, info.routing_key
      if type(ex) ~= 'string' then ex = '' end
      if type(rk) ~= 'string' then rk = '' end
      redis.call('ZADD', index, ARGV[1], tag)
      redis.call('HSET', unacked, tag, '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      taken[#taken + 1] = KEYS[i]
      taken[#taken + 1] = item
      if string.sub(ARGV[4], i, i) == '1' then redis.call('SET', KEYS[n + 3 + i], '1', 'PX', ARGV[5]) end
    end
  end
end
if #taken == 0 then return false end
return taken
"""


def body_problem(payload: dict[str, Any], task_names: frozenset[str]) -> str | None:
    """Why Celery could not take this (well-enveloped) message in, or None when it can."""
    headers = payload.get("headers") or {}
    if payload.get("content-type") != "application/json":
        return f"content type {payload.get('content-type')!r} is not accepted (application/json only)"
    body = payload.get("body")
    if not isinstance(body, str):
        return "body is not a string"
    if payload["properties"].get("body_encoding") == "base64":
        try:
            raw: bytes = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not valid base64"
    else:
        raw = body.encode("utf-8", "surrogatepass")
    try:
        decoded = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "body is not valid JSON"
    if not (isinstance(decoded, list) and len(decoded) == 3 and isinstance(decoded[0], list)
            and isinstance(decoded[1], dict) and isinstance(decoded[2], (dict, type(None)))):
        return "body is not a Celery protocol-2 [args, kwargs, embed] triple"
    task = headers.get("task")
    if not isinstance(task, str) or (task_names and task not in task_names):
        return f"headers.task {task!r} names no task this worker runs"
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        return "headers.id (the task id) is missing"
    return None


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        # The fetch script has already recorded the message in unacked, atomically with the pop.
        virtual.QoS.append(self, message, delivery_tag)

    def renew(self) -> int:
        """Push the visibility deadline of every message this channel holds unacked."""
        for _ in range(3):
            try:
                tags = list(self._delivered)
                break
            except RuntimeError:  # changed size while a task thread acked: try again
                continue
        else:
            return 0
        if tags:
            with self.channel.conn_or_acquire() as client:
                client.zadd(self.unacked_index_key, {tag: time.time() for tag in tags}, xx=True)
        return len(tags)


class Channel(fairqueue.Channel):
    QoS = QoS
    #: seconds between visibility renewals of held messages (0: off)
    visibility_heartbeat_s: float = 0.0
    #: how long the idle wait on the most urgent queue blocks before every queue is checked again
    fetch_idle_timeout: float = 0.1
    dead_letter_key: str = DLQ_KEY
    #: task names this worker runs; a message naming another is dead-lettered (empty: any)
    task_names: tuple[str, ...] = ()
    #: the most urgent queues (one per model served): taking a message from one marks it in transit
    #: (shared.queues.in_transit_key)
    urgent_queues: tuple[str, ...] = ()
    #: of the prefetch (the pool's threads), how many only the urgent queues' messages may fill
    urgent_reserve: int = 0
    from_transport_options = fairqueue.Channel.from_transport_options + (
        "visibility_heartbeat_s", "fetch_idle_timeout", "dead_letter_key", "task_names", "urgent_queues",
        "urgent_reserve",
    )
    _waiting = False

    @cached_property
    def _held_from(self) -> dict[str, str]:
        """delivery tag -> queue of the messages this channel took (pruned to those still held)."""
        return {}

    @cached_property
    def _task_names(self) -> frozenset[str]:
        return frozenset(self.task_names)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        """When the broker connection is lost, Celery closes it, and kombu's channel close builds a
        new pool to restore the messages it holds. By then the connection may already be released
        (its client is None): stock kombu raises AttributeError there, which Celery reports as an
        "Unrecoverable error" and the worker exits (seen when Redis restarted under an idle worker;
        the kombu#970 family). Raising a connection error instead is what Celery ignores while it
        closes and then reconnects; the held messages stay in ``unacked`` and are restored after
        the visibility timeout, as after any other connection loss."""
        if getattr(self.connection, "client", None) is None:
            raise redis.exceptions.ConnectionError("the broker connection was already released")
        return super()._connparams(asynchronous=asynchronous)

    def _queue_keys(self, queues: list[str]) -> list[str]:
        return [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]

    def _fetch_args(self, keys: list[str], want: int = 1) -> list[Any]:
        urgent, fair = set(self.urgent_queues), set(self.fair_queues)
        flags = "".join("1" if key in urgent else "2" if key in fair else "0" for key in keys)
        markers = [in_transit_key(key if key in urgent else "none") for key in keys]
        return [FETCH, 2 * len(keys) + 3, *keys, self.unacked_key, self.unacked_index_key, self.dead_letter_key,
                *markers, time.time(), len(keys), want, flags, IN_TRANSIT_MS]

    def _room(self) -> int:
        """How many messages this channel may take now: prefetch (= the pool's threads, prefetch 1)
        minus what it holds. Taking them in one round trip never holds more than one at a time would."""
        room = self.qos.can_consume_max_estimate()
        return max(1, int(room)) if room is not None else 1

    def _bulk_room(self) -> int | None:
        """How many messages of the less urgent queues this channel may take now (None: no limit).
        With ``urgent_reserve`` r and a prefetch of n (the pool's threads), they hold at most n - r:
        the last r threads stay free for urgent messages, which would otherwise wait in Redis until
        a bulk task ended (its whole batch, on a busy engine) before the channel took another."""
        limit = (self.qos.prefetch_count or 0) - self.urgent_reserve
        if not self.urgent_reserve or limit < 1:
            return None
        # kombu forgets an acked message lazily: it stays in _delivered, marked in _dirty, until a flush.
        delivered, acked, urgent = self.qos._delivered, self.qos._dirty, set(self.urgent_queues)
        held = {tag: queue for tag, queue in self._held_from.items() if tag in delivered and tag not in acked}
        self._held_from.clear()
        self._held_from.update(held)
        return max(0, limit - sum(queue not in urgent for queue in held.values()))

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys, want = self._queue_keys(queues), self._room()
        urgent = [key for key in keys if key in set(self.urgent_queues)]
        bulk_room = self._bulk_room() if urgent else None  # a channel with no urgent queue keeps no reserve
        if bulk_room == 0:  # bulk fills all but the reserve: only urgent messages may come in
            keys = urgent
        elif bulk_room is not None:
            want = min(want, bulk_room)
        self._fetching = keys
        self._waiting = False
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self.client.connection.send_command("EVAL", *self._fetch_args(self._fetching, want))

    def _idle_wait_key(self) -> str:
        """The key an idle channel blocks on: an urgent queue's, whatever order kombu's round-robin
        cycle has rotated the queues into. The cycle puts a queue last once a message came from it,
        so after an interactive request the first key is a bulk one; blocking there would leave the
        next interactive arrival waiting out ``fetch_idle_timeout`` before the fetch looks again."""
        urgent = set(self.urgent_queues)
        return next((key for key in self._fetching if key in urgent), self._fetching[0])

    def _brpop_read(self, **options: Any) -> bool:
        connection = self.client.connection
        try:
            reply = self.client.parse_response(connection, "BLMOVE" if self._waiting else "EVAL", **options)
        except self.connection_errors:
            connection.disconnect()
            self._in_poll = None
            raise
        if self._waiting or not reply:
            if self._waiting:
                self._waiting = False
                self._in_poll = None
                self._flush_brpop_reauth()
            else:  # nothing queued: wait for the most urgent queue to get a message
                self._waiting = True
                self._brpop_sent_at = time.monotonic()
                wait_key = self._idle_wait_key()
                connection.send_command("BLMOVE", wait_key, wait_key, "RIGHT", "RIGHT", self.fetch_idle_timeout)
            raise virtual.Empty()
        self._in_poll = None
        self._flush_brpop_reauth()
        for key, raw in zip(reply[::2], reply[1::2], strict=True):
            dest, item = bytes_to_str(key).rsplit(self.sep, 1)[0], bytes_to_str(raw)
            self._queue_cycle.rotate(dest)
            self._take_in(json.loads(item), item, dest)
        return True

    def _get(self, queue: str) -> dict[str, Any]:
        with self.conn_or_acquire() as client:
            reply = client.eval(*self._fetch_args(self._queue_keys([queue])))
        if not reply:
            raise virtual.Empty()
        return json.loads(bytes_to_str(reply[1]))

    def _take_in(self, payload: dict[str, Any], raw: str, queue: str) -> None:
        """Hand a fetched message to Celery, or dead-letter it if Celery could not take it in."""
        tag = payload["properties"]["delivery_tag"]
        problem = body_problem(payload, self._task_names)
        if problem is None:
            try:
                self._held_from[tag] = queue
                self.connection._deliver(payload, queue)
                return
            except self.connection_errors:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever it is, it must not stop the consumer
                problem = f"the worker could not take the message in: {type(exc).__name__}: {exc}"
        self.dead_letter(tag, payload, raw, queue, problem)

    def dead_letter(self, tag: str, payload: dict[str, Any], raw: str, queue: str, reason: str) -> None:
        """Move a held message to the dead-letter list with its raw body and a reason, and ack it,
        in one transaction: if the worker dies first, the message is still unacked and comes back."""
        headers = payload.get("headers") if isinstance(payload.get("headers"), dict) else {}
        entry = encode_entry(
            headers.get("id") if isinstance(headers.get("id"), str) else None,
            headers.get("task") if isinstance(headers.get("task"), str) else None,
            None, queue, {"code": "INVALID_INPUT", "message": reason, "retryable": False}, [], 1, raw=raw, reason=reason,
        )
        log.warning("dead-lettered a malformed message from %s: %s", queue, reason)
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=True)
            pipe.rpush(self.dead_letter_key, entry)
            pipe.zrem(self.unacked_index_key, tag).hdel(self.unacked_key, tag)
            pipe.execute()
        self.qos._delivered.pop(tag, None)


class Transport(fairqueue.Transport):
    Channel = Channel

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        old = getattr(self.cycle, "_heartbeat_tref", None)
        if old is not None:
            old.cancel()
        interval = float(connection.client.transport_options.get("visibility_heartbeat_s") or 0)
        if interval > 0:
            self.cycle._heartbeat_tref = loop.call_repeatedly(interval, self._renew_visibility)

    def _renew_visibility(self) -> None:
        for channel in list(self.cycle._channels):
            try:
                channel.qos.renew()
            except channel.connection_errors:
                log.debug("visibility renewal failed; next beat retries", exc_info=True)


class SentinelChannel(Channel, fairqueue.SentinelChannel):
    """The worker's channel (reliable fetch, DLQ, heartbeat) through Redis Sentinel."""

    from_transport_options = tuple(dict.fromkeys(Channel.from_transport_options
                                                 + fairqueue.SentinelChannel.from_transport_options))


class SentinelTransport(Transport):
    default_port = 26379
    Channel = SentinelChannel
