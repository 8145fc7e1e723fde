"""Celery tasks: one per request; the model's answer comes from the engine core's next batch.

Every request is still a normal Celery task (own ack, result, revoke, monitoring row). ``handle``
does the one job of a task (parse, choose the model, tokenize, wait for the batch, build the
result); ledger, deadline, cache, dead-lettering and telemetry are middleware around it
(workers/middleware/). Any failure leaves as a FleetError with a stable code; Celery stores it
(state FAILURE) and the client rebuilds it, so callers see the code, message and retry advice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.exceptions import Ignore, Reject

from shared.errors import as_fleet_error
from shared.queues import CLASSIFY_TASK, GENERATE_TASK
from shared.schemas import TaskResult, TaskType, Timings
from workers.engine_client import EngineLost
from workers.middleware import Job
from workers.parsing import parse_request
from workers.runtime import Runtime

log = logging.getLogger(__name__)


def answer(ctx: Runtime, job: Job) -> dict[str, Any]:
    """The task's own work, once the middleware let it run."""
    prepared = job.engine.prepare(job.request)
    output, info = ctx.infer(job.engine, prepared)
    job.executed, job.info = True, info
    submitted = job.request.submitted_at
    result = TaskResult(
        task_type=job.task_type,
        model=job.engine.name,
        output=output.output,
        usage=output.usage,
        timings=Timings(
            queue_wait_ms=max(0.0, job.picked - submitted) * 1000.0,
            batch_wait_ms=info.batch_wait_ms,
            inference_ms=info.inference_ms,
            total_ms=max(0.0, (time.time() - submitted) * 1000.0),
        ),
        batch_size=info.size,
        worker=job.task.request.hostname or "",
        fallback_from=job.fallback_from,
    )
    return result.model_dump(mode="json")


def handle(ctx: Runtime, task: Any, task_type: TaskType, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    job = Job(task, task_type, args[0] if args else None)
    try:
        result = None
        for middleware in ctx.middleware:
            if (result := middleware.before_delivery(ctx, job)) is not None:
                break
        if result is None:
            job.request = parse_request(args, kwargs, task_type)
            job.engine, job.fallback_from = ctx.engine_for(job.request)
            for middleware in ctx.middleware:
                if (result := middleware.before_run(ctx, job)) is not None:
                    break
        if result is None:
            result = answer(ctx, job)
    except EngineLost as exc:  # the core died holding it: back to the queue, never acked as done
        log.warning("engine core lost with task %s in it; requeueing", job.task_id)
        raise Reject(str(exc), requeue=True) from exc
    except (Ignore, Reject):
        raise
    except Exception as exc:  # noqa: BLE001 - every failure leaves with a code
        error = as_fleet_error(exc)
        for middleware in reversed(ctx.middleware):
            middleware.after_failure(ctx, job, error, exc)
        raise error from None
    for middleware in reversed(ctx.middleware):
        middleware.after_success(ctx, job, result)
    return result


def register(app: Celery, context: Callable[[], Runtime]) -> None:
    """The fleet's two tasks on ``app``; each call gets the consumer's context from ``context``."""

    # ignore_result: the ledger stores SUCCESS itself, in the step that records the answer (one round
    # trip instead of three); failures are still stored by Celery (task_store_errors_even_if_ignored).
    @app.task(name=GENERATE_TASK, bind=True, ignore_result=True)
    def generate(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return handle(context(), self, TaskType.TEXT_GENERATION, args, kwargs)

    @app.task(name=CLASSIFY_TASK, bind=True, ignore_result=True)
    def classify(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return handle(context(), self, TaskType.CLASSIFICATION, args, kwargs)
