"""Celery tasks: one per request, each parks on the micro-batcher while its batch runs.

Every request is still a normal Celery task (own ack, result, revoke, monitoring row). Any failure
leaves here as a FleetError with a stable code; Celery stores it (state FAILURE) and the client
rebuilds it, so callers see the code, message and retry advice.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery.exceptions import Ignore, Reject
from opentelemetry import trace
from redis.exceptions import RedisError

from shared.errors import ErrorCode, FleetError, as_fleet_error
from shared.queues import CLASSIFY_TASK, GENERATE_TASK
from shared.schemas import TaskResult, TaskType, Timings
from workers import metrics, runtime
from workers.app import app
from workers.engine_client import EngineLost
from workers.ledger import StoredState
from workers.parsing import parse_request

log = logging.getLogger(__name__)
# The caller's own mistakes: failing them again would fail the same way, so they skip the DLQ.
CALLER_ERRORS = {ErrorCode.INVALID_INPUT, ErrorCode.PROMPT_TOO_LONG, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.CANCELLED}


def stored_state(task: Any, state: str, result: Any) -> StoredState:
    """Celery's result-backend write for this task, encoded as Celery would (``result_extended``
    meta included), so the ledger can make it in the same round trip as its own bookkeeping. The
    tasks are ``ignore_result``: Celery itself stores only failures."""
    backend = task.backend
    meta = backend._get_result_meta(result=result, state=state, traceback=None, request=task.request)
    meta["task_id"] = task.request.id
    return StoredState(backend.get_key_for_task(task.request.id).decode(), backend.encode(meta),
                       int(backend.expires or 86_400))


def handle(task: Any, task_type: TaskType, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    rt = runtime.current()
    task_id = task.request.id
    queue = (task.request.delivery_info or {}).get("routing_key") or ""
    delivery_tag = (task.request.properties or {}).get("delivery_tag") or ""
    try:
        started = stored_state(task, "STARTED", {"pid": os.getpid(), "hostname": task.request.hostname})
        claim = rt.ledger.claim(task_id, delivery_tag, started)
    except RedisError as exc:  # Redis is gone for longer than the client rides out: put it back
        raise Reject(f"ledger unavailable: {exc}", requeue=True) from exc
    deliveries = claim.deliveries
    if claim.outcome == "done":  # redelivered after it was answered: answer once, from the ledger
        log.warning("task %s delivered again after it was answered; returning the recorded result", task_id)
        rt.ledger.record(task_id, claim.result, stored_state(task, "SUCCESS", claim.result), executed=False)
        return claim.result
    if claim.outcome == "busy":  # another delivery of this task id is running it right now
        log.warning("task %s is already running from another delivery; this one stands down", task_id)
        raise Ignore()
    picked = time.time()
    span = trace.get_current_span()  # the task's run span, continued from the producer's trace
    span.set_attribute("autoglm.deliveries", deliveries)
    try:
        if deliveries > rt.settings.broker.max_deliveries:
            raise FleetError(
                ErrorCode.WORKER_LOST,
                f"delivered {deliveries} times without finishing (it may be crashing workers); "
                "moved to the dead-letter queue, see `autoglm dlq list`",
            )
        request = parse_request(args, kwargs, task_type)
        if request.deadline is not None and picked > request.deadline:
            raise FleetError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"deadline passed {picked - request.deadline:.1f}s before a worker picked the request up",
            )
        engine, fallback_from = rt.engine_for(request)
        cache_key = request.cache_key(engine.name)
        if cache_key and (hit := rt.cache.get(cache_key)) is not None:
            metrics.TASKS.labels(str(task_type), "cache_hit", "").inc()
            answer_json = hit.model_copy(update={"worker": task.request.hostname or ""}).model_dump(mode="json")
            rt.ledger.record(task_id, answer_json, stored_state(task, "SUCCESS", answer_json), executed=False)
            return answer_json
        prepared = engine.prepare(request)
        answer, info = rt.infer(engine, prepared)
    except EngineLost as exc:  # the core died holding it: back to the queue, never acked as done
        log.warning("engine core lost with task %s in it; requeueing", task_id)
        raise Reject(str(exc), requeue=True) from exc
    except Exception as exc:  # noqa: BLE001 - every failure leaves with a code
        error = as_fleet_error(exc)
        span.set_attribute("autoglm.error_code", str(error.code))
        span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
        metrics.TASKS.labels(str(task_type), "failure", str(error.code)).inc()
        log.info("failed: %s", error, extra={"code": str(error.code)})
        if error.code == ErrorCode.INTERNAL:
            log.exception("request failed with an unexpected error")
        if error.code not in CALLER_ERRORS:
            rt.dead_letters.push(task_id, task.name, args[0] if args else None, queue, error.to_dict(),
                                 getattr(exc, "history", []), deliveries)
        raise error from None
    done = time.time()
    queue_wait_s = max(0.0, picked - request.submitted_at)
    span.set_attributes({
        "autoglm.model": engine.name, "autoglm.queue_wait_ms": queue_wait_s * 1000.0,
        "autoglm.batch_wait_ms": info.batch_wait_ms, "autoglm.inference_ms": info.inference_ms,
        "autoglm.batch.size": info.size,
    })
    metrics.QUEUE_WAIT.labels(queue).observe(queue_wait_s)
    metrics.TASKS.labels(str(task_type), "success", "").inc()
    log.info("answered in a batch of %d", info.size, extra={"model": engine.name})
    result = TaskResult(
        task_type=task_type,
        model=engine.name,
        output=answer.output,
        usage=answer.usage,
        timings=Timings(
            queue_wait_ms=queue_wait_s * 1000.0,
            batch_wait_ms=info.batch_wait_ms,
            inference_ms=info.inference_ms,
            total_ms=max(0.0, (done - request.submitted_at) * 1000.0),
        ),
        batch_size=info.size,
        worker=task.request.hostname or "",
        fallback_from=fallback_from,
    )
    answer_json = result.model_dump(mode="json")
    rt.ledger.record(task_id, answer_json, stored_state(task, "SUCCESS", answer_json))
    if cache_key:
        rt.cache.put(cache_key, result)
    return answer_json


# ignore_result: the ledger stores SUCCESS itself, in the step that records the answer (one round
# trip instead of three); failures are still stored by Celery (task_store_errors_even_if_ignored).
@app.task(name=GENERATE_TASK, bind=True, ignore_result=True)
def generate(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return handle(self, TaskType.TEXT_GENERATION, args, kwargs)


@app.task(name=CLASSIFY_TASK, bind=True, ignore_result=True)
def classify(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return handle(self, TaskType.CLASSIFICATION, args, kwargs)
