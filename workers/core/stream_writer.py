"""The engine core's side of token streams and cancellation (shared/streams.py has the format).

Writes are buffered and sent in one pipeline per loop turn, so a step that produced a token for 20
streaming rows costs one round trip, not 20. A failed write is logged and dropped: a reader whose
stream stalls falls back to the task's result (producers/client.py), so Redis trouble never fails
a generation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from redis import Redis
from redis.exceptions import RedisError

from shared.streams import MAXLEN, cancel_key, stream_key

log = logging.getLogger(__name__)


class StreamWriter:
    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._pending: list[tuple[str, dict[str, str | int]]] = []

    def text(self, task_id: str, offset: int, text: str) -> None:
        if text:
            self._pending.append((task_id, {"o": offset, "d": text}))

    def end(self, task_id: str, finish_reason: str) -> None:
        self._pending.append((task_id, {"end": finish_reason}))

    def error(self, task_id: str, code: str, message: str) -> None:
        self._pending.append((task_id, {"error": code, "message": message}))

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        pipe = self.redis.pipeline(transaction=False)
        for task_id in dict.fromkeys(task_id for task_id, _ in pending):
            key = stream_key(task_id)
            for fields in (f for t, f in pending if t == task_id):
                pipe.xadd(key, fields, maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
            pipe.expire(key, self.ttl_s)
        try:
            pipe.execute()
        except RedisError as exc:
            log.warning("dropped %d stream entries (%s); readers fall back to the results", len(pending), exc)

    def cancelled(self, task_ids: Iterable[str]) -> set[str]:
        """The tasks among ``task_ids`` whose producer asked to cancel them (one round trip)."""
        ids = list(task_ids)
        if not ids:
            return set()
        try:
            marks = self.redis.mget([cancel_key(t) for t in ids])
        except RedisError as exc:
            log.warning("cannot check cancellations (%s); trying again next turn", exc)
            return set()
        return {t for t, mark in zip(ids, marks, strict=True) if mark is not None}
