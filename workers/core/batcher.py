"""Micro-batching: many requests, one model call per batch.

The engine core's loop ``submit``s each prepared request that arrives (a Future per request) and,
between its other work, ``take``s the next batch and ``run``s it (``start()`` does the same in a
thread of its own, for in-process callers and tests). A batch starts with the most urgent request
(lowest queue-class rank, then oldest) and adds others that
can share its forward pass (same batch key) in the same order until ``max_batch_size`` (per key) or the
padded-token budget is reached, and waits at most ``max_wait_ms`` (counted from the first request's
arrival) for company. It flushes early when no more requests can arrive (every worker thread is
already waiting or running). A full batch of lower-priority work goes the moment the model is free,
unless ``urgent_upstream`` says more urgent requests are queued in the broker: then it holds for the
refill window so the threads just released can bring them in first. A batch that raises is split
in halves and retried, so one bad request fails alone and its batch-mates still get answers.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from shared.errors import as_fleet_error
from shared.telemetry import tracer
from workers.wire import BatchInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """What a request adds to a padded batch: ``rows`` sequences of up to ``width`` tokens."""

    rows: int
    width: int


@dataclass(order=True)
class _Pending:
    order: tuple[int, int]
    key: Hashable = field(compare=False)
    shape: Shape = field(compare=False)
    payload: Any = field(compare=False)
    future: Future = field(compare=False)
    enqueued: float = field(compare=False)
    span_context: trace.SpanContext = field(compare=False)


HOLD_RECHECK_S = 0.002  # how soon a held bulk batch is looked at again
RunBatch = Callable[[Hashable, list[Any]], Sequence[Any]]
# Runs one attempt-loop of a batch: (call, history) -> results; history collects each failed attempt.
CallPolicy = Callable[[Callable[[], Sequence[Any]], list[dict[str, Any]]], Sequence[Any]]


def _call_once(fn: Callable[[], Sequence[Any]], history: list[dict[str, Any]]) -> Sequence[Any]:
    try:
        return fn()
    except Exception as exc:
        history.append({"error": f"{type(exc).__name__}: {exc}", "at": time.time()})
        raise


class MicroBatcher:
    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch_size: int | Callable[[Hashable], int],
        max_batch_tokens: int,
        max_wait_ms: float,
        max_pending: int | None = None,
        call_policy: CallPolicy = _call_once,
        urgent_upstream: Callable[[], bool] | None = None,
        most_urgent: int = 0,
        name: str = "micro-batcher",
    ) -> None:
        self._run = run
        self._call = call_policy
        self._max_size = max_batch_size if callable(max_batch_size) else (lambda _key: max_batch_size)
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_pending = max_pending
        self._waiting: list[_Pending] = []
        self._running = 0
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._idle_since = time.monotonic()
        self._urgent_upstream = urgent_upstream
        self.most_urgent = most_urgent  # the priority value of work that is never held back
        self._upstream_checked_at: float | None = None  # the idle period the last answer belongs to
        self._upstream_urgent = False
        self.recent_batch_sizes: deque[int] = deque(maxlen=10_000)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> MicroBatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(self, key: Hashable, payload: Any, shape: Shape, rank: int = 0,
               span_context: trace.SpanContext | None = None) -> Future:
        """Queue one request; the Future resolves to ``(result, BatchInfo)`` or raises its error.
        ``rank``: its queue class's rank, lower runs first. ``span_context``: the request's span (default: the current
        one), which the batch span links to."""
        future: Future = Future()
        context = span_context if span_context is not None else trace.get_current_span().get_span_context()
        item = _Pending((rank, next(self._seq)), key, shape, payload, future, time.monotonic(), context)
        with self._cond:
            if self._stopping:
                raise RuntimeError("batcher is stopping")
            self._waiting.append(item)
            self._cond.notify()
        return future

    # -- batch formation -----------------------------------------------------------------------
    def _padded_tokens(self, members: list[_Pending]) -> int:
        return sum(m.shape.rows for m in members) * max(m.shape.width for m in members)

    def _select(self) -> tuple[list[_Pending], bool, bool]:
        """Members of the next batch (most urgent first), whether the batch is full, and whether
        nothing else can arrive (every worker thread is already waiting or running)."""
        ordered = sorted(self._waiting)
        head = ordered[0]
        chosen = [head]
        max_size = self._max_size(head.key)
        full = False
        rows, width = head.shape.rows, head.shape.width
        for item in ordered[1:]:
            if len(chosen) >= max_size:
                break
            if item.key != head.key:
                continue
            if (rows + item.shape.rows) * max(width, item.shape.width) > self.max_batch_tokens:
                full = True
                break
            chosen.append(item)
            rows, width = rows + item.shape.rows, max(width, item.shape.width)
        full = full or len(chosen) >= max_size
        closed = self.max_pending is not None and len(self._waiting) + self._running >= self.max_pending
        return chosen, full, closed

    def _hold_for_upstream(self, head: _Pending) -> bool:
        """Whether a full batch of lower-priority work should wait for more urgent requests that
        are queued in the broker. Asked once per idle period: it costs a broker round trip."""
        if self._urgent_upstream is None or head.order[0] == self.most_urgent:
            return False
        if self._upstream_checked_at != self._idle_since:
            self._upstream_checked_at = self._idle_since
            try:
                self._upstream_urgent = self._urgent_upstream()
            except Exception:  # noqa: BLE001 - a failed peek must never stall the model
                log.warning("could not check for urgent requests upstream", exc_info=True)
                self._upstream_urgent = False
        return self._upstream_urgent

    def _poll(self, hold_less_urgent: bool = False) -> tuple[list[_Pending] | None, float | None]:
        """Under the lock: the next batch if one should go now, else (None, seconds until one may
        go), or (None, None) when nothing waits. ``hold_less_urgent``: the model is busy with
        urgent work elsewhere, so only a batch of the most urgent priority may go."""
        if not self._waiting:
            return None, None
        chosen, full, closed = self._select()
        if hold_less_urgent and chosen[0].order[0] != self.most_urgent and not self._stopping:
            return None, HOLD_RECHECK_S
        # The wait for company starts when the head arrived or when the model became free,
        # whichever is later: right after a batch, the threads it released are still
        # fetching their next messages (interactive first), so give them max_wait to land.
        wait_left = max(chosen[0].enqueued, self._idle_since) + self.max_wait - time.monotonic()
        ready = closed or (full and not (wait_left > 0 and self._hold_for_upstream(chosen[0])))
        if ready or wait_left <= 0 or self._stopping:
            picked = {id(m) for m in chosen}
            self._waiting = [w for w in self._waiting if id(w) not in picked]
            self._running = len(chosen)
            return chosen, 0.0
        return None, wait_left

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            while True:
                batch, wait = self._poll()
                if batch is not None:
                    return batch
                if wait is None:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                self._cond.wait(wait)

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.execute(batch)

    # -- driven from the caller's own loop (no batcher thread) ---------------------------------
    def take(self, hold_less_urgent: bool = False) -> tuple[list[_Pending] | None, float | None]:
        """For a caller that runs batches in its own loop instead of ``start()``: the next batch
        if one should go now, else (None, seconds until one may go | None when nothing waits).
        ``hold_less_urgent``: the caller's model is running urgent work of its own (continuous
        batching's interactive rows); a bulk batch now would make every one of their decoding
        steps wait for it, so only most-urgent batches go."""
        with self._cond:
            if self._stopping and not self._waiting:
                return None, None
            return self._poll(hold_less_urgent)

    def close(self) -> None:
        """Without a batcher thread: stop taking requests and run what was submitted."""
        with self._cond:
            self._stopping = True
        while (batch := self.take()[0]) is not None:
            self.execute(batch)

    def execute(self, batch: list[_Pending]) -> None:
        """Run one batch taken with ``take()`` (or by the batcher thread); resolves its futures."""
        try:
            self._execute(batch)
        finally:
            with self._cond:
                self._running = 0
                self._idle_since = time.monotonic()

    # -- execution -----------------------------------------------------------------------------
    def _execute(self, batch: list[_Pending], history: list[dict[str, Any]] | None = None) -> None:
        """Run a batch under the call policy (retries); if it still fails, split it in halves so
        only the request that fails alone fails. The failing request's exception carries the
        batch's error history as ``.history``."""
        split = history is not None  # a half of a failed batch: a child of that batch's span
        history = [] if history is None else history
        # The batch is its own span: a child of its first member's request (so a lone request's
        # trace runs straight through) with a link to every member's request span.
        parent = trace.get_current_span() if split else trace.NonRecordingSpan(batch[0].span_context)
        with tracer().start_as_current_span(
            "autoglm.batch",
            context=trace.set_span_in_context(parent),
            links=[trace.Link(m.span_context) for m in batch if m.span_context.is_valid],
            attributes={"autoglm.batch.size": len(batch), "autoglm.batch.padded_tokens": self._padded_tokens(batch),
                        "autoglm.batch.key": str(batch[0].key)},
        ) as span:
            self._execute_in_span(batch, history, span)

    def _execute_in_span(self, batch: list[_Pending], history: list[dict[str, Any]], span: trace.Span) -> None:
        inherited = len(history)  # attempts of the parent batch, already on its span
        started = time.monotonic()
        try:
            results = self._call(lambda: self._checked_run(batch), history)
        except Exception as exc:  # noqa: BLE001 - isolate the failing member(s)
            for attempt in history[inherited:]:
                span.add_event("attempt failed", {k: str(v) for k, v in attempt.items()})
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
            if len(batch) == 1:
                exc.history = list(history)  # type: ignore[attr-defined]
                batch[0].future.set_exception(exc)
                return
            log.warning("batch of %d failed (%s: %s); splitting to isolate", len(batch), type(exc).__name__, exc)
            half = len(batch) // 2
            span.add_event("split", {"sizes": f"{half}+{len(batch) - half}"})
            self._execute(batch[:half], list(history))
            self._execute(batch[half:], list(history))
            return
        for attempt in history[inherited:]:
            span.add_event("attempt failed", {k: str(v) for k, v in attempt.items()})
        finished = time.monotonic()
        self.recent_batch_sizes.append(len(batch))
        failed = [(m, r) for m, r in zip(batch, results, strict=True) if isinstance(r, BaseException)]
        leader = True
        for member, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                continue
            info = BatchInfo(
                size=len(batch),
                batch_wait_ms=(started - member.enqueued) * 1000.0,
                inference_ms=(finished - started) * 1000.0,
                leader=leader,
            )
            leader = False
            member.future.set_result((result, info))
        if failed:  # members that failed on their own (a remote backend's calls): they alone go round again
            error = as_fleet_error(failed[0][1])
            span.add_event("members failed", {"count": len(failed), "code": str(error.code)})
            self._execute([m for m, _ in failed], [*history, {"code": str(error.code), "message": error.message, "at": time.time()}])

    def _checked_run(self, batch: list[_Pending]) -> Sequence[Any]:
        """The batch's results. A backend may return an exception in a member's place (it failed
        alone); when every member failed, the batch failed: raised, so the call policy applies."""
        results = self._run(batch[0].key, [m.payload for m in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
        if all(isinstance(r, BaseException) for r in results):
            raise results[0]
        return results
