"""AsyncFleetClient: the fleet from asyncio web backends without blocking the event loop.

Publishing goes through the sync client's Celery producer in a worker thread (kombu is
synchronous; a publish is ~0.2 ms, so the thread pool is never the bottleneck). Results are read
with redis.asyncio straight from the Celery result backend keys, decoded by Celery's own backend
code, when the worker's PUBLISH of the state says it changed (one pub/sub connection for all
waits: producers/published.py; polled with a capped backoff where pub/sub fails): waiting costs
the loop nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from producers.client import RECHECK_S, FleetClient, Request, unknown_task
from producers.outcome import READY, decode_outcome
from producers.published import Published
from shared import streams, webhook_urls
from shared.broker import async_redis, submitted_key
from shared.config import Settings
from shared.errors import ErrorCode, FleetError, as_fleet_error
from shared.schemas import Priority, TaskResult, TaskType, Usage


class AsyncTaskHandle:
    def __init__(self, client: AsyncFleetClient, task_id: str) -> None:
        self._client, self.id = client, task_id
        self._reader = streams.Reader(task_id)

    @property
    def finish_reason(self) -> str | None:
        """Why the answer ended, once ``stream()`` has read its end; else None (TaskHandle's)."""
        return self._reader.end.finish if self._reader.end is not None else None

    @property
    def usage(self) -> Usage | None:
        """The answer's token counts, once ``stream()`` has read its end; else None (TaskHandle's)."""
        return self._reader.end.usage if self._reader.end is not None else None

    async def status(self) -> str:
        return await self._client.status(self.id)

    async def result(self, timeout: float | None = None) -> TaskResult:
        return await self._client.result(self.id, timeout)

    def stream(self, timeout: float | None = None, idle_timeout: float | None = None) -> AsyncIterator[str]:
        """``async for piece in handle.stream(): ...`` (see TaskHandle.stream and stream_task)."""
        self._reader = streams.Reader(self.id)
        return self._client.stream_task(self.id, timeout, idle_timeout, self._reader)

    async def cancel(self) -> None:
        await self._client.cancel(self.id)

    def __repr__(self) -> str:
        return f"AsyncTaskHandle({self.id})"


class AsyncFleetClient:
    """>>> async with AsyncFleetClient() as fleet:
    ...     handle = await fleet.submit_generate("What is deep learning?")
    ...     answer = await handle.result(timeout=30)
    """

    def __init__(self, redis_url: str | None = None, settings: Settings | None = None) -> None:
        self._sync = FleetClient(redis_url, settings)
        self.settings = self._sync.settings
        self._backend = self._sync.app.backend
        # Many awaiting coroutines share a few connections: a blocking pool queues them instead of
        # failing with "too many connections".
        # Short timeouts and one quick retry: during an outage callers get BROKER_UNAVAILABLE in
        # about a second (a gateway answers 503 + Retry-After) instead of hanging on the default 5 s.
        master = self.settings.broker.master_name
        self._redis = async_redis(self._sync.redis_url, master, max_connections=16, socket_timeout=2.0,
                                  socket_connect_timeout=1.0, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1))
        # Stream readers block in XREAD (up to 250 ms each turn): a pool of their own, so a gateway's
        # many open SSE responses never queue the result polls and rate-limit calls behind them.
        self._stream_redis = async_redis(self._sync.redis_url, master, max_connections=self.settings.streams.max_readers,
                                         socket_timeout=5.0, socket_connect_timeout=1.0,
                                         retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1))
        # Every awaited result wakes on its PUBLISH, on one connection of that pool (producers/published.py).
        self._published = Published(self._redis)

    # -- submitting ----------------------------------------------------------------------------
    async def submit(self, request: Request | dict[str, Any]) -> AsyncTaskHandle:
        # Validation errors surface here, before any I/O. A callback_url's SSRF check resolves its host
        # on the DNS executor of its own, bounded by webhooks.dns_timeout_s (shared/webhook_urls.py): a name
        # that never answers costs this caller that long and no other caller anything.
        built = self._sync.build(request, resolve_callback=False)
        if built.callback_url:
            hooks = self.settings.webhooks
            await webhook_urls.resolve_async(built.callback_url, hooks.allowed_hosts, hooks.dns_timeout_s)
        handle = await asyncio.to_thread(self._sync.submit, built, False)
        return AsyncTaskHandle(self, handle.id)

    async def submit_generate(self, prompt: str | None = None, **params: Any) -> AsyncTaskHandle:
        return await self.submit({"task_type": TaskType.TEXT_GENERATION, "prompt": prompt, **params})

    async def submit_classify(self, text: str, labels: list[str] | list[str | dict[str, str]],
                              **params: Any) -> AsyncTaskHandle:
        params.setdefault("priority", Priority.BULK)
        return await self.submit({"task_type": TaskType.CLASSIFICATION, "text": text, "labels": labels, **params})

    async def submit_many(self, requests: Iterable[Request | dict[str, Any]]) -> list[AsyncTaskHandle]:
        handles = await asyncio.to_thread(self._sync.submit_many, list(requests))
        return [AsyncTaskHandle(self, h.id) for h in handles]

    async def cancel(self, task_id: str) -> None:
        """Revoke a task and stop its generation if it runs (see TaskHandle.cancel)."""
        await asyncio.to_thread(self._sync.handle(task_id).cancel)

    async def stream(self, prompt: str | None = None, timeout: float | None = 120, **params: Any) -> AsyncIterator[str]:
        """``async for piece in fleet.stream("Tell me a story"): ...``; the task is cancelled when the
        caller stops iterating early."""
        handle = await self.submit_generate(prompt, stream=True, **params)
        finished = False
        try:
            async for piece in self.stream_task(handle.id, timeout):
                yield piece
            finished = True
        finally:
            if not finished:
                await self.cancel(handle.id)

    async def stream_task(self, task_id: str, timeout: float | None = None, idle_timeout: float | None = None,
                          reader: streams.Reader | None = None) -> AsyncIterator[str]:
        """A task's text as it is generated (TaskHandle.stream, without blocking the loop).
        ``timeout``: TimeoutError when the whole stream takes longer; ``idle_timeout``: when no text
        arrives for this long (what a streaming client expects: a long answer that keeps coming is
        never cut, a stalled one is). ``reader``: one whose ``end`` the caller reads afterwards."""
        reader = reader or streams.Reader(task_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        heard = time.monotonic()
        while True:
            try:
                # A blocking read holds a pooled connection: keep it short, so many streams share few.
                records = await self._stream_redis.xread({reader.key: reader.last}, block=250, count=256)
            except RedisError as exc:
                raise FleetError(ErrorCode.BROKER_UNAVAILABLE, f"cannot read task {task_id}'s stream: {exc}") from exc
            for piece in reader.feed(records):
                heard = time.monotonic()
                yield piece
            if reader.done:
                return
            if not records and (await self._meta(task_id))["status"] in READY:
                if rest := reader.rest(getattr((await self.result(task_id, timeout=5)).output, "text", "")):
                    yield rest
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} did not finish streaming within {timeout}s")
            if idle_timeout is not None and time.monotonic() - heard >= idle_timeout:
                raise TimeoutError(f"task {task_id} sent no text for {idle_timeout}s")

    @property
    def sync(self) -> FleetClient:
        """The sync client underneath (blocking: call it from threads, as the Batch API's runner does)."""
        return self._sync

    @property
    def redis(self) -> aioredis.Redis:
        """The shared asyncio Redis connection pool (gateways keep their own keys there too)."""
        return self._redis

    # -- results -------------------------------------------------------------------------------
    async def status(self, task_id: str) -> str:
        """PENDING (queued), STARTED, SUCCESS, FAILURE, REVOKED, or UNKNOWN (never submitted to this
        fleet, or expired: see TaskHandle.status)."""
        status = (await self._meta(task_id))["status"]
        return "UNKNOWN" if status == "PENDING" and not await self.known(task_id) else status

    async def known(self, task_id: str) -> bool:
        """Whether this fleet has (or had, within the result's lifetime) a task with this id."""
        try:
            return bool(await self._redis.exists(submitted_key(task_id)))
        except RedisError as exc:
            raise FleetError(ErrorCode.BROKER_UNAVAILABLE, f"cannot read task {task_id}'s state: {exc}") from exc

    async def _meta(self, task_id: str) -> dict[str, Any]:
        try:
            raw = await self._redis.get(self._backend.get_key_for_task(task_id))
        except RedisError as exc:
            raise FleetError(ErrorCode.BROKER_UNAVAILABLE, f"cannot read task {task_id}'s state: {exc}") from exc
        if raw is None:
            return {"status": "PENDING", "result": None}
        return self._backend.decode_result(raw)

    async def result(self, task_id: str, timeout: float | None = None) -> TaskResult:
        """The TaskResult, or FleetError with the worker's code (NOT_FOUND for an id this fleet does
        not know), or TimeoutError.

        Wakes on the state's PUBLISH (producers/published.py) and reads the stored state then, and
        at least every RECHECK_S; without pub/sub (it failed) it polls with a backoff capped at
        200 ms."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay, looked_up = 0.005, False
        async with self._published.watch(self._backend.get_key_for_task(task_id)) as watch:
            while True:
                if watch is not None:
                    watch.changed.clear()  # before the read: a PUBLISH after it wakes the wait below
                meta = await self._meta(task_id)
                if meta["status"] in READY:
                    break
                if not looked_up and meta["status"] == "PENDING":  # once per wait: is there such a task at all?
                    looked_up = True
                    if not await self.known(task_id):
                        raise unknown_task(task_id)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"task {task_id} not finished after {timeout}s (status {meta['status']})")
                if watch is not None and not watch.lost:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(watch.changed.wait(), RECHECK_S if left is None else min(RECHECK_S, left))
                else:
                    await asyncio.sleep(delay if left is None else min(delay, left))
                    delay = min(delay * 1.5, 0.2)
        return decode_outcome(task_id, meta["status"], meta["result"])

    async def generate(self, prompt: str | None = None, timeout: float | None = 120, **params: Any) -> TaskResult:
        return await (await self.submit_generate(prompt, **params)).result(timeout)

    async def classify(self, text: str, labels: list[str], timeout: float | None = 120, **params: Any) -> TaskResult:
        params.setdefault("priority", Priority.INTERACTIVE)
        return await (await self.submit_classify(text, labels, **params)).result(timeout)

    @staticmethod
    async def gather(*awaitables: Awaitable[TaskResult]) -> list[TaskResult | FleetError | TimeoutError]:
        """All-settled: every outcome in order; one failure never hides the others."""
        outcomes = await asyncio.gather(*awaitables, return_exceptions=True)
        return [o if isinstance(o, TaskResult | TimeoutError) else as_fleet_error(o) for o in outcomes]

    async def close(self) -> None:
        await self._published.close()
        await self._redis.aclose()
        await self._stream_redis.aclose()
        self._sync.close()

    async def __aenter__(self) -> AsyncFleetClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
