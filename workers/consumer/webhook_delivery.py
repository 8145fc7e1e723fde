"""Delivering completion webhooks, off the inference path: an asyncio deliverer per worker.

Why not a task on the consumers' threads (as before): a receiver that accepts and never answers, or
sends one byte every few seconds, held a consumer thread per delivery; 20 such callbacks took every
thread of a worker and other tenants' chats waited behind them (issue "One tenant cannot hurt
another"). Here:

- A finished task's delivery is appended to its tenant's Redis stream
  (``autoglm:webhooks:<webhook queue>:<tenant>``, the tenant registered in a set beside it); nothing
  waits for it in the consumer.
- One deliverer per worker (a thread running an event loop in the engine-owning consumer) reads
  the streams as a Redis consumer group: an entry stays pending until its outcome is final, and a
  deliverer that died leaves its entries to be claimed by another (``XAUTOCLAIM``) once they have
  been idle longer than any delivery can take. Delivery is at least once; ``X-AutoGLM-Task-Id``
  lets receivers drop repeats.
- Each attempt has a total deadline (``webhooks.timeout_s`` for connect, send and the whole
  answer, not per read), and each tenant has at most ``webhooks.max_in_flight_per_tenant``
  deliveries under way: the deliverer reads a tenant's stream only while that tenant has room, so
  a tenant whose receivers hang waits for its own deliveries, never another tenant's.
- The URL is checked again before delivery (DNS may have changed) and the connection goes to the
  address that was checked (shared/webhook_urls.py ``Target``).

Retries run with tenacity per ``webhooks`` config (attempts, backoff); connection errors,
timeouts, 5xx, 408 and 429 are retried, any other 4xx is final (the receiver refused it). Each
attempt's outcome is kept in Redis (``shared.webhook_urls.OUTCOME_KEY``), where the task's status shows it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import Counter
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from shared import webhook_urls
from shared.broker import async_redis
from shared.config import Settings
from shared.errors import FleetError
from shared.schemas import ANONYMOUS_TENANT

log = logging.getLogger(__name__)
RETRIED_STATUSES = {408, 429}
GROUP = "deliverers"


class Undelivered(Exception):
    """This attempt did not deliver; another may."""


def stream_key(settings: Settings, tenant: str) -> str:
    return f"autoglm:webhooks:{settings.webhook_queue}:{tenant}"


def tenants_key(settings: Settings) -> str:
    return f"autoglm:webhooks:{settings.webhook_queue}:tenants"


def outcome(task_id: str, result: dict[str, Any] | None, error: FleetError | None) -> dict[str, Any]:
    """What a receiver gets: the task's id and state, and its result or its error."""
    return {"id": task_id, "status": "SUCCESS" if error is None else "FAILURE", "result": result,
            "error": error.to_dict() if error is not None else None}


def _record_fields(fields: dict[str, Any]) -> dict[str, str]:
    return {**{k: str(v) for k, v in fields.items()}, "updated_at": f"{time.time():.3f}"}


def enqueue(client: redis.Redis, settings: Settings, task_id: str, url: str, payload: dict[str, Any],
            tenant: str | None) -> None:
    """Hand a delivery to the deliverers (called by the webhook middleware; returns at once)."""
    who = tenant or ANONYMOUS_TENANT
    try:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN/Infinity are not JSON: strict receivers reject them; send null instead
        body = json.dumps(_finite(payload), separators=(",", ":"), allow_nan=False)
    key = webhook_urls.OUTCOME_KEY.format(task_id=task_id)
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, mapping=_record_fields({"status": "pending", "attempts": 0, "url": url}))
    pipe.expire(key, settings.broker.result_expires_s)
    pipe.sadd(tenants_key(settings), who)
    pipe.xadd(stream_key(settings, who), {"task_id": task_id, "url": url, "payload": body, "tenant": who})
    pipe.execute()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class Deliverer:
    """The worker's webhook deliverer: an event loop in a thread of its own (``start``/``stop``)."""

    def __init__(self, settings: Settings, redis_url: str, name: str) -> None:
        self.settings, self.redis_url, self.name = settings, redis_url, name
        config = settings.webhooks
        # An entry idle this long belongs to a deliverer that died: no live delivery takes longer.
        self.claim_after_ms = int(1000 * (config.attempts * (config.timeout_s + config.backoff_max_s + 1) + 30))
        self.in_flight: Counter[str] = Counter()  # tenant -> deliveries under way
        self._known: set[str] = set()  # streams whose consumer group exists
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-deliverer", daemon=True)

    def start(self) -> Deliverer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking deliveries; those under way stay pending and are claimed again later."""
        self._stopping.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:  # noqa: BLE001 - logged; the worker's inference goes on without it
            log.exception("webhook deliverer stopped")

    async def _main(self) -> None:
        client = async_redis(self.redis_url, self.settings.broker.master_name, socket_timeout=10, socket_connect_timeout=2)
        config = self.settings.webhooks
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
        async with httpx.AsyncClient(timeout=config.timeout_s, limits=limits, follow_redirects=False) as http:
            last_claim = 0.0
            while not self._stopping.is_set():
                try:
                    streams = await self._streams(client)
                    if time.monotonic() - last_claim > 5:
                        last_claim = time.monotonic()
                        for tenant, key in streams.items():
                            await self._claim(client, http, tenant, key)
                    await self._read(client, http, streams)
                except (redis.RedisError, OSError) as exc:
                    log.warning("webhook deliverer: Redis unavailable (%s); retrying", exc)
                    self._known.clear()  # a restarted Redis lost the consumer groups: create them again
                    await asyncio.sleep(1.0)
            for task in list(self._tasks):
                task.cancel()
        await client.aclose()

    async def _streams(self, client: aioredis.Redis) -> dict[str, str]:
        tenants = sorted(t.decode() for t in await client.smembers(tenants_key(self.settings)))
        streams = {tenant: stream_key(self.settings, tenant) for tenant in tenants}
        for key in streams.values():
            if key not in self._known:
                try:
                    await client.xgroup_create(key, GROUP, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                self._known.add(key)
        return streams

    def _room(self, tenant: str) -> int:
        config = self.settings.webhooks
        total = sum(self.in_flight.values())
        return max(0, min(config.max_in_flight_per_tenant - self.in_flight[tenant], config.max_in_flight - total))

    async def _read(self, client: aioredis.Redis, http: httpx.AsyncClient, streams: dict[str, str]) -> None:
        ready = {key: ">" for tenant, key in streams.items() if self._room(tenant) > 0}
        if not ready:  # nobody has had a webhook yet, or every tenant with one is at its limit
            await asyncio.sleep(0.5 if not streams else 0.05)
            return
        count = min(self._room(tenant) for tenant, key in streams.items() if key in ready)
        replies = await client.xreadgroup(GROUP, self.name, ready, count=count, block=500)
        for key, entries in replies or []:
            for entry_id, fields in entries:
                self._spawn(client, http, key.decode() if isinstance(key, bytes) else key, entry_id, fields)

    async def _claim(self, client: aioredis.Redis, http: httpx.AsyncClient, tenant: str, key: str) -> None:
        """Take over the entries of a deliverer that died (idle past any live delivery's length)."""
        room = self._room(tenant)
        if room <= 0:
            return
        reply = await client.xautoclaim(key, GROUP, self.name, self.claim_after_ms, "0-0", count=room)
        for entry_id, fields in reply[1]:
            if fields:  # deleted entries come back empty
                self._spawn(client, http, key, entry_id, fields)

    def _spawn(self, client: aioredis.Redis, http: httpx.AsyncClient, key: str, entry_id: Any, fields: dict) -> None:
        data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in fields.items()}
        tenant = data.get("tenant", ANONYMOUS_TENANT)
        self.in_flight[tenant] += 1
        task = asyncio.create_task(self._deliver_entry(client, http, key, entry_id, data))
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            self.in_flight[tenant] -= 1

        task.add_done_callback(done)

    async def _deliver_entry(self, client: aioredis.Redis, http: httpx.AsyncClient, key: str, entry_id: Any,
                             data: dict[str, str]) -> None:
        try:
            await deliver(client, http, self.settings, data["task_id"], data["url"], data["payload"].encode())
        except asyncio.CancelledError:
            raise  # stopping: the entry stays pending and is claimed again
        except Exception:  # noqa: BLE001 - one delivery's bug must not stop the others
            log.exception("webhook for task %s: delivery raised", data.get("task_id"))
        pipe = client.pipeline(transaction=True)
        pipe.xack(key, GROUP, entry_id)
        pipe.xdel(key, entry_id)
        await pipe.execute()


async def _record(client: aioredis.Redis, settings: Settings, task_id: str, **fields: Any) -> None:
    key = webhook_urls.OUTCOME_KEY.format(task_id=task_id)
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, mapping=_record_fields(fields))
    pipe.expire(key, settings.broker.result_expires_s)
    await pipe.execute()


async def deliver(client: aioredis.Redis, http: httpx.AsyncClient, settings: Settings, task_id: str, url: str,
                  body: bytes) -> None:
    """Deliver one outcome with retries; the final status is recorded (delivered/failed/refused)."""
    config = settings.webhooks
    try:
        target = await webhook_urls.resolve_async(url, config.allowed_hosts, config.dns_timeout_s)
    except FleetError as exc:
        await _record(client, settings, task_id, status="refused", attempts=0, last_error=exc.message)
        return
    attempts = 0
    https = url.lower().startswith("https:")

    async def attempt() -> None:
        nonlocal attempts
        attempts += 1
        timestamp = int(time.time())
        headers = {"content-type": "application/json", webhook_urls.TIMESTAMP: str(timestamp), webhook_urls.TASK_ID: task_id,
                   "host": target.host_header()}
        if config.secret:
            headers[webhook_urls.SIGNATURE] = webhook_urls.sign(config.secret, timestamp, body)
        try:
            async with asyncio.timeout(config.timeout_s):  # the whole attempt, not each read
                response = await http.post(target.pinned_url(), content=body, headers=headers,
                                           extensions={"sni_hostname": target.host} if https else {})
        except (httpx.HTTPError, TimeoutError) as exc:
            reason = f"no answer within {config.timeout_s:g}s" if isinstance(exc, TimeoutError) else \
                f"{type(exc).__name__}: {exc}"
            await _record(client, settings, task_id, status="retrying", attempts=attempts, last_error=reason)
            raise Undelivered(reason) from exc
        if response.status_code < 300:
            await _record(client, settings, task_id, status="delivered", attempts=attempts,
                          last_status=response.status_code, last_error="")
            return
        await _record(client, settings, task_id, status="retrying", attempts=attempts,
                      last_status=response.status_code, last_error=f"HTTP {response.status_code}")
        if response.status_code >= 500 or response.status_code in RETRIED_STATUSES:
            raise Undelivered(f"HTTP {response.status_code}")
        raise PermissionError(f"HTTP {response.status_code}")  # the receiver refused it: final

    try:
        async for retry in AsyncRetrying(
                stop=stop_after_attempt(config.attempts), retry=retry_if_exception_type(Undelivered), reraise=True,
                wait=wait_exponential_jitter(multiplier=config.backoff_initial_s, max=config.backoff_max_s, jitter=0.1)):
            with retry:
                await attempt()
    except (Undelivered, PermissionError) as exc:
        await _record(client, settings, task_id, status="failed", attempts=attempts, last_error=str(exc))
        log.warning("webhook for task %s not delivered after %d attempts: %s", task_id, attempts, exc)
