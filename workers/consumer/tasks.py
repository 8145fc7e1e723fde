"""Celery tasks: one per request; the model's answer comes from the engine core's next batch.

Every request is still a normal Celery task (own ack, result, revoke, monitoring row). ``handle``
does the one job of a task (parse, choose the model, tokenize, wait for the batch, build the
result); ledger, deadline, cache, dead-lettering and telemetry are middleware around it
(workers/consumer/middleware/). Any failure leaves as a FleetError with a stable code; Celery stores it
(state FAILURE) and the client rebuilds it, so callers see the code, message and retry advice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.exceptions import Ignore, Reject

from shared import task_types
from shared.errors import ErrorCode, FleetError, as_fleet_error
from shared.pipelines import STEP_TASK
from shared.queues import WEBHOOK_TASK
from shared.schemas import ClassifyOutput, GenerateOutput, TaskResult, Timings
from workers.consumer import metrics, pipeline, webhook_delivery
from workers.consumer.core_client import EngineLost
from workers.consumer.middleware import Job
from workers.consumer.parsing import parse_request
from workers.consumer.runtime import Runtime
from workers.handlers import handler as task_handler
from workers.wire import Answer, BatchInfo

log = logging.getLogger(__name__)


def run_model(ctx: Runtime, engine: Any, request: Any, task_id: str = "") -> tuple[Answer, BatchInfo]:
    """The model's answer, with the model's processors around it (workers/processors). ``task_id``
    names the task's token stream and cancellation marker (shared/streams.py)."""
    processors = ctx.processors[engine.name]
    request = processors.before(request)
    if getattr(request, "stream", False) and not processors.can_stream(request):
        request = request.model_copy(update={"stream": False})  # the reader gets the processed text whole
    answer, info = ctx.infer(engine, task_handler(request.task_type).prepare(engine, request), task_id)
    return Answer(processors.after(request, answer.output), answer.usage), info


def answer(ctx: Runtime, job: Job) -> dict[str, Any]:
    """The task's own work, once the middleware let it run. A model that turns out unavailable
    while answering (a remote server's 503) hands the request to a loaded model of its fallback
    chain, when the MODEL_UNAVAILABLE policy says ``fallback``."""
    try:
        output, info = run_model(ctx, job.engine, job.request, job.task_id)
    except FleetError as exc:
        fallback = ctx.fallback_for(job.engine.name, job.request) if exc.code == ErrorCode.MODEL_UNAVAILABLE else None
        if fallback is None:
            raise
        log.warning("model %s unavailable for task %s (%s); answering with %s", job.engine.name, job.task_id, exc.message,
                    fallback.name)
        job.fallback_from, job.engine = job.fallback_from or job.engine.name, fallback
        output, info = run_model(ctx, job.engine, job.request, job.task_id)
    job.executed, job.info = True, info
    submitted = job.request.submitted_at
    result = TaskResult(
        task_type=job.task_type,
        model=job.engine.name,
        output=output.output if isinstance(output.output, GenerateOutput | ClassifyOutput)
        else output.output.model_dump(mode="json"),
        usage=output.usage,
        timings=Timings(
            queue_wait_ms=metrics.elapsed_s(submitted, job.picked) * 1000.0,
            batch_wait_ms=info.batch_wait_ms,
            inference_ms=info.inference_ms,
            total_ms=metrics.elapsed_s(submitted, time.time()) * 1000.0,
        ),
        batch_size=info.size,
        worker=job.task.request.hostname or "",
        fallback_from=job.fallback_from,
    )
    return result.model_dump(mode="json")


def handle(ctx: Runtime, task: Any, task_type: str, args: tuple[Any, ...], kwargs: dict[str, Any],
           finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """One delivery of a task. ``finish`` turns the answer into what is recorded and returned (a
    pipeline step adds it to the pipeline's result); a delivery answered from the ledger returns
    what was recorded, already finished."""
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
            if finish is not None:
                result = finish(result)
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


def register(app: Celery, context: Callable[[], Runtime]) -> list[str]:
    """One Celery task per installed task type on ``app`` (shared/task_types.py); each call gets the
    consumer's context from ``context``. Returns the task names."""

    def task_for(task_type: str) -> Callable[..., dict[str, Any]]:
        def run(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return handle(context(), self, task_type, args, kwargs)

        return run

    names = []
    for spec in task_types.installed():
        # ignore_result: the ledger stores SUCCESS itself, in the step that records the answer (one
        # round trip instead of three); failures are still stored by Celery (task_store_errors_even_if_ignored).
        # throws: a FleetError is an answer with a code (a cancel, a prompt too long), which Celery would
        # log at ERROR as "raised unexpected" with a traceback; the Telemetry middleware logs each
        # failure once, and an INTERNAL one at ERROR with its traceback.
        app.task(name=spec.celery_name, bind=True, ignore_result=True, throws=(FleetError,))(task_for(spec.name))
        names.append(spec.celery_name)

    @app.task(name=WEBHOOK_TASK, bind=True, ignore_result=True)
    def webhook(self: Any, task_id: str, url: str, payload: dict[str, Any]) -> None:
        """A delivery published by an earlier version as a Celery task: handed to the deliverer."""
        ctx = context()
        webhook_delivery.enqueue(ctx.ledger.client, ctx.settings, task_id, url, payload, None)

    @app.task(name=STEP_TASK, bind=True, ignore_result=True, throws=(FleetError,))
    def pipeline_step(self: Any, state: dict[str, Any]) -> dict[str, Any]:
        return pipeline.run_step(context(), self, state, handle)

    return [*names, STEP_TASK, WEBHOOK_TASK]
