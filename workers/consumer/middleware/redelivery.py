"""Redelivery is safe: each task id is run by one delivery and answered once (workers/consumer/ledger.py).

The ledger claim also stores Celery's STARTED state and the record its SUCCESS state, in the same
round trips (the tasks are ``ignore_result``; Celery stores failures itself).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.exceptions import Ignore, Reject
from redis.exceptions import RedisError

from shared.broker import NotReplicated
from shared.errors import ErrorCode, FleetError
from workers.consumer.ledger import StoredState
from workers.consumer.middleware.job import Job, Middleware

log = logging.getLogger(__name__)


def stored_state(task: Any, state: str, result: Any) -> StoredState:
    """Celery's result-backend write for this task, encoded as Celery would (``result_extended``
    meta included, via Celery's own ``_get_result_meta``), for the ledger to make in its own step."""
    backend = task.backend
    meta = backend._get_result_meta(result=result, state=state, traceback=None, request=task.request)
    meta["task_id"] = task.request.id
    return StoredState(backend.get_key_for_task(task.request.id).decode(), backend.encode(meta),
                       int(backend.expires or 86_400))


class Redelivery(Middleware):
    def before_delivery(self, ctx: Any, job: Job) -> dict[str, Any] | None:
        started = stored_state(job.task, "STARTED", {"pid": os.getpid(), "hostname": job.task.request.hostname})
        try:
            claim = ctx.ledger.claim(job.task_id, job.delivery_tag, started)
        except RedisError as exc:  # Redis is gone for longer than the client rides out: put it back
            raise Reject(f"ledger unavailable: {exc}", requeue=True) from exc
        job.deliveries = claim.deliveries
        if claim.outcome == "done":  # redelivered after it was answered: answer once, from the ledger
            log.warning("task %s delivered again after it was answered; returning the recorded result", job.task_id)
            return claim.result
        if claim.outcome == "busy":  # another delivery of this task id is running it right now
            log.warning("task %s is already running from another delivery; this one stands down", job.task_id)
            raise Ignore()
        if job.deliveries > ctx.settings.broker.max_deliveries:
            raise FleetError(
                ErrorCode.WORKER_LOST,
                f"delivered {job.deliveries} times without finishing (it may be crashing workers); "
                "moved to the dead-letter queue, see `autoglm dlq list`",
            )
        return None

    def after_success(self, ctx: Any, job: Job, result: dict[str, Any]) -> None:
        try:
            ctx.ledger.record(job.task_id, result, stored_state(job.task, "SUCCESS", result), executed=job.executed,
                              delivery_tag=job.delivery_tag)
        except NotReplicated as exc:  # on the master only: not acked, so a failover cannot lose the task
            log.warning("task %s answered but its record was not replicated (%s); the message goes back", job.task_id, exc)
            raise Reject(str(exc), requeue=True) from exc
