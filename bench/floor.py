"""The floor under any Celery-based fleet: a plain Celery echo task with the fleet's settings.

Started by the harness as ``celery -A bench.floor worker --pool threads``: the same broker, result
backend, threads pool, prefetch 1 and acks_late as the fleet's worker, no model and no machinery.
What the fleet's own per-task work costs is measured against this, in the same run.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("floor", broker=os.environ.get("REDIS_URL"), backend=os.environ.get("REDIS_URL"))
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"], worker_prefetch_multiplier=1,
    task_acks_late=True, worker_disable_prefetch=True, broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="floor.echo")
def echo(request: dict) -> dict:
    return {"echo": request.get("text", "")}
