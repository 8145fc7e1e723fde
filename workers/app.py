"""The worker's Celery app: shared queue wiring plus the settings that make batching and priority work.

Why these settings (measured, see ../shared/FACTS.md and docs/architecture.md):
- threads pool: one process owns the model; many task threads park on the batcher at once.
- prefetch 1 + acks_late: a worker never holds more messages than it has threads, so interactive
  messages are not stuck behind a reserved bulk backlog; a crash redelivers unacked work.
- queues listed interactive first with ``queue_order_strategy=priority``: Redis is polled in order.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Celery, signals
from opentelemetry.instrumentation.celery import CeleryInstrumentor

from shared.config import Settings, load_settings
from shared.errors import ErrorCode, FleetError
from shared.queues import CLASSIFY_TASK, GENERATE_TASK, make_celery
from shared.schemas import Priority
from shared.telemetry import setup_logging, setup_tracing
from workers import metrics, runtime
from workers.consumers import ConsumerGroup
from workers.main import celery_argv

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> Celery:
    if not settings.redis_url:
        raise FleetError(
            ErrorCode.BROKER_UNAVAILABLE, "the worker needs REDIS_URL (or run `autoglm worker`, which can embed one)"
        )
    app = make_celery(settings, settings.redis_url, name="autoglm-worker")
    app.conf.broker_transport_options.update(
        visibility_heartbeat_s=settings.broker.heartbeat_s, task_names=(GENERATE_TASK, CLASSIFY_TASK),
        urgent_queue=settings.queue_name(Priority.INTERACTIVE) if Priority.INTERACTIVE in settings.worker.queues else "",
    )
    app.conf.update(
        # Reliable fetch, malformed messages to the DLQ, visibility heartbeat (workers/transport.py).
        broker_transport="workers.transport:Transport",
        include=["workers.tasks"],
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # STARTED and SUCCESS are written by the ledger in its own round trips (workers/ledger.py);
        # Celery stores failures.
        task_track_started=False,
        task_store_errors_even_if_ignored=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=settings.worker.send_task_events,
        task_send_sent_event=True,
    )
    return app


settings = load_settings().on_device()
app = create_app(settings)


_group: ConsumerGroup | None = None


@signals.worker_init.connect
def _load_models(sender: Any = None, **_: object) -> None:
    global _group
    setup_tracing("autoglm-worker")
    CeleryInstrumentor().instrument()  # continues the producer's trace from the message headers
    ctx = runtime.build_runtime(settings)
    runtime.install(ctx)
    if ctx.engine.owner and settings.worker_consumers > 1:
        hostname = getattr(sender, "hostname", None) or f"autoglm-{os.getpid()}@{socket.gethostname()}"
        argv = celery_argv(settings, None, hostname)
        _group = ConsumerGroup(argv, ctx.engine.address, settings.worker_consumers, hostname).start()
    if settings.worker.metrics_port and ctx.engine.owner:  # one /metrics per worker: the owner's
        metrics.serve(settings.worker.metrics_port, settings.redis_url or "", [q.name for q in settings.queues.values()])


@signals.setup_logging.connect
def _logging(**_: object) -> None:
    # Connecting here stops Celery from installing its own handlers: every line is ours (JSON).
    setup_logging(settings.worker.loglevel, settings.worker.log_format)


@signals.worker_shutdown.connect
def _stop_batcher(**_: object) -> None:
    if _group is not None:
        _group.stop()
    try:
        runtime.current().close()
    except FleetError:
        pass
