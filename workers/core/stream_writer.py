"""The engine core's side of token streams and cancellation (shared/streams.py has the format).

Writes are buffered and sent in one pipeline, so a step that produced a token for 20 streaming rows
costs one round trip, not 20; and a stream's middle pieces are sent at most every ``interval_s``
(``streams.interval_ms``), several steps' tokens in one piece, as vLLM's ``stream_interval`` does:
on a CPU a step of a small model takes a few milliseconds, and a round trip per step (the engine
core's, then Redis's and every reader's wake-up on the same cores) cost about a tenth of the
decoding rate. A stream's first piece (its time to first token), its end and its errors go out at
the turn that wrote them. A failed write is logged and dropped: a reader whose stream stalls falls
back to the task's result (producers/client.py), so Redis trouble never fails a generation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from redis import Redis
from redis.exceptions import RedisError

from shared.streams import MAXLEN, cancel_key, stream_key

log = logging.getLogger(__name__)


class StreamWriter:
    def __init__(self, redis: Redis, ttl_s: int, interval_s: float = 0.0) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self._pending: list[tuple[str, dict[str, str | int]]] = []
        self._due = False  # a first piece, an end or an error waits: the next flush sends
        self._sent_at = 0.0

    def text(self, task_id: str, offset: int, text: str) -> None:
        if text:
            self._pending.append((task_id, {"o": offset, "d": text}))
            self._due = self._due or offset == 0

    def end(self, task_id: str, finish_reason: str) -> None:
        self._pending.append((task_id, {"end": finish_reason}))
        self._due = True

    def error(self, task_id: str, code: str, message: str) -> None:
        self._pending.append((task_id, {"error": code, "message": message}))
        self._due = True

    def flush(self, force: bool = False) -> None:
        """Send what is buffered if anything is due, ``interval_s`` has passed or ``force``."""
        if not self._pending:
            return
        now = time.monotonic()
        if not (force or self._due or now - self._sent_at >= self.interval_s):
            return
        self._due, self._sent_at = False, now
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
