"""The engine core's side of token streams and cancellation (shared/streams.py has the format).

Writes are buffered and sent in one pipeline, so a step that produced a token for 20 streaming rows
costs one round trip, not 20; and a stream's middle pieces are sent at most every ``interval_s``
(``streams.interval_ms``), several steps' tokens in one piece (one stream entry: a row's text since
its last piece), as vLLM's ``stream_interval`` does:
on a CPU a step of a small model takes a few milliseconds, and a round trip per step (the engine
core's, then Redis's and every reader's wake-up on the same cores) cost about a tenth of the
decoding rate. A stream's first piece (its time to first token), its end and its errors go out at
the turn that wrote them. A failed write is logged and dropped: a reader whose stream stalls falls
back to the task's result (producers/client.py), so Redis trouble never fails a generation.

The engine core's check for cancelled rows rides on these writes (``flush(ask_cancelled=...)``):
every wake-up of Redis and of a reader on the cores the model decodes on stalls a decoding step
by about a millisecond (bench/RESULTS.md), so a check that goes alone is one more of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from redis import Redis
from redis.exceptions import RedisError

from shared.schemas import Usage
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
        self._open: dict[str, dict[str, str | int]] = {}  # a task's text piece not sent yet, still growing

    def text(self, task_id: str, offset: int, text: str) -> None:
        if not text:
            return
        piece = self._open.get(task_id)
        if piece is not None and int(piece["o"]) + len(str(piece["d"])) == offset:
            piece["d"] = f"{piece['d']}{text}"  # the text that follows it: the same piece grows
            return
        self._open[task_id] = piece = {"o": offset, "d": text}
        self._pending.append((task_id, piece))
        self._due = self._due or offset == 0

    def end(self, task_id: str, finish_reason: str, usage: Usage | None = None) -> None:
        """The answer is complete; ``usage``: its tokens, for the readers."""
        self._open.pop(task_id, None)
        fields: dict[str, str | int] = {"end": finish_reason}
        if usage is not None:
            fields["prompt_tokens"], fields["completion_tokens"] = usage.prompt_tokens, usage.completion_tokens
        self._pending.append((task_id, fields))
        self._due = True

    def error(self, task_id: str, code: str, message: str) -> None:
        self._open.pop(task_id, None)
        self._pending.append((task_id, {"error": code, "message": message}))
        self._due = True

    def interval_passed(self) -> bool:
        """Whether a middle piece would go at the next flush (``interval_s`` since the last write).
        The engine core decodes a row's text only then (workers/core/continuous.py), not every step
        to find what a piece that is not sent yet would hold: on a CPU that decoding sat between
        two decoding steps (bench/RESULTS.md)."""
        return time.monotonic() - self._sent_at >= self.interval_s

    def due(self, force: bool = False) -> bool:
        """Whether a flush now would write: something is buffered, and it is due, ``interval_s`` has
        passed or ``force``."""
        return bool(self._pending) and (force or self._due or self.interval_passed())

    def flush(self, force: bool = False, ask_cancelled: Sequence[str] = ()) -> set[str]:
        """Send what is buffered if it is ``due``, and ask which of ``ask_cancelled`` their producer
        cancelled, in one round trip; returns those cancelled."""
        write = self.due(force)
        if not (write or ask_cancelled):
            return set()
        pipe = self.redis.pipeline(transaction=False)
        pending: list[tuple[str, dict[str, str | int]]] = []
        if write:
            self._due, self._sent_at = False, time.monotonic()
            pending, self._pending = self._pending, []
            self._open.clear()
            for task_id in dict.fromkeys(task_id for task_id, _ in pending):
                key = stream_key(task_id)
                for fields in (f for t, f in pending if t == task_id):
                    pipe.xadd(key, fields, maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
                pipe.expire(key, self.ttl_s)
        ids = list(ask_cancelled)
        if ids:
            pipe.mget([cancel_key(t) for t in ids])
        try:
            replies = pipe.execute()
        except RedisError as exc:
            log.warning("dropped %d stream entries (%s); readers fall back to the results%s", len(pending), exc,
                        "; cancellations are asked again next time" if ids else "")
            return set()
        return {t for t, mark in zip(ids, replies[-1], strict=True) if mark is not None} if ids else set()
