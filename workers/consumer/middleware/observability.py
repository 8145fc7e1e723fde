"""Spans, metrics and log lines for every outcome of a task."""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace

from shared.errors import ErrorCode, FleetError
from workers.consumer import metrics
from workers.consumer.middleware.job import Job, Middleware

log = logging.getLogger("workers.consumer.tasks")


class Telemetry(Middleware):
    """On the task's run span, continued from the producer's trace (opentelemetry-instrumentation-celery)."""

    def after_success(self, ctx: Any, job: Job, result: dict[str, Any]) -> None:
        trace.get_current_span().set_attribute("autoglm.deliveries", job.deliveries)
        if not job.executed:
            return
        queue_wait_s = metrics.elapsed_s(job.request.submitted_at, job.picked)
        trace.get_current_span().set_attributes({
            "autoglm.model": job.engine.name, "autoglm.queue_wait_ms": queue_wait_s * 1000.0,
            "autoglm.batch_wait_ms": job.info.batch_wait_ms, "autoglm.inference_ms": job.info.inference_ms,
            "autoglm.batch.size": job.info.size,
        })
        metrics.QUEUE_WAIT.labels(job.queue).observe(queue_wait_s)
        metrics.TASKS.labels(str(job.task_type), "success", "").inc()
        log.info("answered in a batch of %d", job.info.size, extra={"model": job.engine.name})

    def after_failure(self, ctx: Any, job: Job, error: FleetError, exc: BaseException) -> None:
        span = trace.get_current_span()
        span.set_attributes({"autoglm.deliveries": job.deliveries, "autoglm.error_code": str(error.code)})
        span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
        metrics.TASKS.labels(str(job.task_type), "failure", str(error.code)).inc()
        log.info("failed: %s", error, extra={"code": str(error.code)})
        if error.code == ErrorCode.INTERNAL:
            log.error("request failed with an unexpected error", exc_info=exc)
