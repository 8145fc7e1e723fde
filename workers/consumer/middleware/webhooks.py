"""A request with a ``callback_url`` gets its outcome POSTed once the task is done (workers/consumer/webhook_delivery.py).

After the answer is recorded (this middleware sits outside the ledger's), the delivery is appended
to the tenant's webhook stream, where the worker's deliverer picks it up: the consumer thread never
waits on a receiver. A redelivered message answered from the ledger appends none, so a receiver is
called once per task.
"""

from __future__ import annotations

from typing import Any

from shared.errors import FleetError
from workers.consumer.middleware.job import Job, Middleware
from workers.consumer.webhook_delivery import enqueue, outcome


class Webhooks(Middleware):
    def _publish(self, ctx: Any, job: Job, payload: dict[str, Any]) -> None:
        url = getattr(job.request, "callback_url", None) if job.request is not None else None
        if not url:
            return
        enqueue(ctx.ledger.client, ctx.settings, job.task_id, url, payload, getattr(job.request, "tenant", None))

    def after_success(self, ctx: Any, job: Job, result: dict[str, Any]) -> None:
        self._publish(ctx, job, outcome(job.task_id, result, None))

    def after_failure(self, ctx: Any, job: Job, error: FleetError, exc: BaseException) -> None:
        self._publish(ctx, job, outcome(job.task_id, None, error))
