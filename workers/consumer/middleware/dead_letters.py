"""Requests the fleet could not serve go to the dead-letter queue with their error history.

The caller's own mistakes skip it: failing them again would fail the same way.
"""

from __future__ import annotations

from typing import Any

from shared.errors import ErrorCode, FleetError
from workers.consumer.middleware.job import Job, Middleware

CALLER_ERRORS = {ErrorCode.INVALID_INPUT, ErrorCode.PROMPT_TOO_LONG, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.CANCELLED}


class DeadLettering(Middleware):
    def after_failure(self, ctx: Any, job: Job, error: FleetError, exc: BaseException) -> None:
        if error.code not in CALLER_ERRORS:
            ctx.dead_letters.push(job.task_id, job.task.name, job.payload, job.queue, error.to_dict(),
                                  getattr(exc, "history", []), job.deliveries)
