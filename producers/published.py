"""Waiting for a task's stored state on Redis pub/sub, for asyncio callers: one connection for
every result a client awaits.

Why: the worker PUBLISHes each state it stores on the result key's channel (Celery's rule, kept by
workers/consumer/ledger.py), so a waiter can wake the moment its answer is recorded. Polling the
stored state instead answers half a poll interval late on average: ~100 ms for an answer
recorded a second in, with the async client's backoff capped at 200 ms (bench/RESULTS.md) - on
every non-streaming chat completion a gateway serves.

No race: a waiter reads the state only after Redis has confirmed its SUBSCRIBE (the reply comes on
this connection, in order), so a state stored before is read and one stored after is published to
it. (Celery's own waiting does not wait for that reply: see TaskHandle.result in producers/client.py.)

A connection that fails (Redis restarts, a Sentinel failover) wakes every waiter with ``lost``
set: they go back to polling for the rest of their wait, and the next wait opens a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.utils import str_if_bytes

log = logging.getLogger(__name__)


class Watch:
    """One waiter's view of a channel: ``changed`` is set at each message, and at a lost connection."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.lost = False


class Published:
    def __init__(self, redis: aioredis.Redis, confirm_s: float = 1.0) -> None:
        self._redis = redis
        self.confirm_s = confirm_s  # longer without a SUBSCRIBE's reply: poll instead
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._watches: dict[str, set[Watch]] = {}
        # One future per SUBSCRIBE sent, resolved by its reply: replies come in the order sent.
        self._replies: dict[str, deque[asyncio.Future[None]]] = {}
        # Commands one at a time: redis-py's PubSub is not safe for concurrent commands (100 waits
        # starting together each took a connection of their own while it connected, and drained
        # the client's pool).
        self._commands = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()  # lost connections being closed (the loop keeps only weak references)

    @contextlib.asynccontextmanager
    async def watch(self, channel: str | bytes) -> AsyncIterator[Watch | None]:
        """A Watch on ``channel`` once Redis has confirmed the subscription; None when it cannot
        be had within ``confirm_s`` (the caller polls)."""
        channel = str_if_bytes(channel)  # Celery's result keys are bytes; replies name channels as text here
        watch = Watch()
        subscribed = await self._subscribe(channel, watch)
        try:
            yield watch if subscribed else None
        finally:
            await self._unsubscribe(channel, watch)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        self._pubsub = self._reader = None

    async def _subscribe(self, channel: str, watch: Watch) -> bool:
        watches = self._watches.setdefault(channel, set())
        watches.add(watch)
        try:
            if len(watches) == 1:  # the first waiter on this channel subscribes; later ones share it
                if self._pubsub is None:
                    self._pubsub = self._redis.pubsub()
                pubsub = self._pubsub
                reply = asyncio.get_running_loop().create_future()
                self._replies.setdefault(channel, deque()).append(reply)
                try:
                    async with self._commands:
                        await asyncio.wait_for(pubsub.subscribe(channel), self.confirm_s)
                except BaseException:
                    with contextlib.suppress(KeyError, ValueError):  # never sent: no reply will come
                        self._replies[channel].remove(reply)
                    raise
                if self._reader is None:  # reading needs the connection the first SUBSCRIBE opened
                    self._reader = asyncio.create_task(self._read(pubsub))
            replies = self._replies.get(channel)
            if replies:  # this channel's SUBSCRIBE is not confirmed yet
                await asyncio.wait_for(asyncio.shield(replies[-1]), self.confirm_s)
            return not watch.lost
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.debug("no pub/sub for %s (%s); polling", channel, exc)
            return False

    async def _unsubscribe(self, channel: str, watch: Watch) -> None:
        watches = self._watches.get(channel)
        if watches is None or watch not in watches:
            return  # the connection was lost meanwhile: nothing to undo
        watches.discard(watch)
        if watches:
            return
        del self._watches[channel]
        if self._pubsub is not None:
            try:
                async with self._commands:
                    await asyncio.wait_for(self._pubsub.unsubscribe(channel), self.confirm_s)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                log.debug("cannot unsubscribe %s (%s)", channel, exc)

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                kind, channel = message["type"], str_if_bytes(message["channel"])
                if kind == "subscribe":
                    replies = self._replies.get(channel)
                    if replies:
                        reply = replies.popleft()
                        if not reply.done():
                            reply.set_result(None)
                        if not replies:
                            del self._replies[channel]
                elif kind == "message":
                    for watch in self._watches.get(channel, ()):
                        watch.changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever broke the connection, waiters poll
            log.warning("result pub/sub connection lost (%s); waiting callers poll", exc)
            self._lose(pubsub)

    def _lose(self, pubsub: Any) -> None:
        for watches in self._watches.values():
            for watch in watches:
                watch.lost = True
                watch.changed.set()
        for replies in self._replies.values():
            for reply in replies:
                if not reply.done():
                    reply.set_exception(RedisError("the pub/sub connection was lost"))
                    reply.exception()  # retrieved: a reply nobody awaits any more logs nothing
        self._watches.clear()
        self._replies.clear()
        if self._pubsub is pubsub:
            self._pubsub = self._reader = None
        closing = asyncio.get_running_loop().create_task(_close_quietly(pubsub))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)


async def _close_quietly(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()
