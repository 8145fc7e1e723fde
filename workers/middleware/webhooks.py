"""A request with a ``callback_url`` gets its outcome POSTed once the task is done (workers/webhooks.py).

After the answer is recorded (this middleware sits outside the ledger's), a delivery task is
published to the webhook queue; a redelivered message answered from the ledger publishes none, so
a receiver is called once per task.
"""

from __future__ import annotations

from typing import Any

from shared.errors import FleetError
from shared.queues import WEBHOOK_TASK
from workers.middleware.base import Job, Middleware
from workers.webhooks import outcome, record


class Webhooks(Middleware):
    def _publish(self, ctx: Any, job: Job, payload: dict[str, Any]) -> None:
        url = getattr(job.request, "callback_url", None) if job.request is not None else None
        if not url:
            return
        record(ctx, job.task_id, status="pending", attempts=0, url=url)
        queue = ctx.settings.webhook_queue
        job.task.app.send_task(WEBHOOK_TASK, args=[job.task_id, url, payload], queue=queue, routing_key=queue)

    def after_success(self, ctx: Any, job: Job, result: dict[str, Any]) -> None:
        self._publish(ctx, job, outcome(job.task_id, result, None))

    def after_failure(self, ctx: Any, job: Job, error: FleetError, exc: BaseException) -> None:
        self._publish(ctx, job, outcome(job.task_id, None, error))
