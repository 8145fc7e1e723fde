"""A request past its deadline is refused when a worker picks it up, never run."""

from __future__ import annotations

from typing import Any

from shared.errors import ErrorCode, FleetError
from workers.consumer.middleware.job import Job, Middleware


class Deadlines(Middleware):
    def before_run(self, ctx: Any, job: Job) -> dict[str, Any] | None:
        deadline = job.request.deadline
        if deadline is not None and job.picked > deadline:
            raise FleetError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"deadline passed {job.picked - deadline:.1f}s before a worker picked the request up",
            )
        return None
