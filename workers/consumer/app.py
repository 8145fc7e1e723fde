"""A consumer process: its Celery app and its worker context, both built from settings.

Why these settings (measured, see ../shared/FACTS.md and docs/architecture.md):
- threads pool: one process feeds the engine core; many task threads park on it at once.
- prefetch 1 + acks_late: a worker never holds more messages than it has threads, so interactive
  messages are not stuck behind a reserved bulk backlog; a crash redelivers unacked work.
- queues listed interactive first with ``queue_order_strategy=priority``: Redis is polled in order.

No module-level app or settings: ``ConsumerProcess(settings)`` builds the app, registers the tasks
against its own context (arq's ``ctx``: what tasks need, built once at ``worker_init``) and runs
it; `python -m workers` is the way in (workers/main.py).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Celery, signals
from opentelemetry.instrumentation.celery import CeleryInstrumentor

from shared import task_types
from shared.broker import is_sentinel
from shared.config import Settings
from shared.errors import ErrorCode, FleetError
from shared.pipelines import STEP_TASK
from shared.queues import WEBHOOK_TASK, make_celery, use_sentinel_transport
from shared.telemetry import setup_logging, setup_tracing
from workers.consumer import metrics, tasks
from workers.consumer.group import ConsumerGroup
from workers.consumer.presence import Presence
from workers.consumer.runtime import Runtime, build_runtime
from workers.consumer.webhook_delivery import Deliverer
from workers.lifecycle import EngineCoreProcess

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> Celery:
    if not settings.redis_url:
        raise FleetError(
            ErrorCode.BROKER_UNAVAILABLE, "the worker needs REDIS_URL (or run `autoglm worker`, which can embed one)"
        )
    app = make_celery(settings, settings.redis_url, name="autoglm-worker")
    transport = "workers.consumer.transport:" + ("SentinelTransport" if is_sentinel(settings.redis_url) else "Transport")
    if is_sentinel(settings.redis_url):
        use_sentinel_transport(transport)
    app.conf.broker_transport_options.update(
        visibility_heartbeat_s=settings.broker.heartbeat_s,
        task_names=(*(spec.celery_name for spec in task_types.installed()), STEP_TASK, WEBHOOK_TASK),
        urgent_queues=tuple(settings.urgent_queues()),
        urgent_reserve=settings.worker.interactive_threads,
    )
    app.conf.update(
        # Reliable fetch, malformed messages to the DLQ, visibility heartbeat (workers/consumer/transport.py).
        broker_transport=transport,
        worker_pool="threads",
        worker_concurrency=settings.consumer_threads,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # STARTED and SUCCESS are written by the ledger in its own round trips (workers/consumer/ledger.py);
        # Celery stores failures.
        task_track_started=False,
        task_store_errors_even_if_ignored=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=settings.worker.send_task_events,
        task_send_sent_event=True,
    )
    return app


class ConsumerProcess:
    """One Celery consumer process of a worker. Its context (``ctx``) exists from ``worker_init`` to
    ``worker_shutdown``; tasks get it passed in, never from a global."""

    def __init__(self, settings: Settings, argv: list[str], core: EngineCoreProcess | None = None,
                 group: ConsumerGroup | None = None) -> None:
        self.settings = settings
        self.argv = argv  # `celery worker` arguments (workers/main.py celery_argv)
        self.core = core  # the engine core workers/main.py started before importing this module
        self.app = create_app(settings)
        self.ctx: Runtime | None = None
        self.group = group  # the extra consumers, started with the core (workers/main.py); stopped with this one
        self.presence: Presence | None = None
        self.deliverer: Deliverer | None = None
        tasks.register(self.app, self.context)
        # Celery signals are process-wide; this process runs one app.
        signals.worker_init.connect(self._start, weak=False)
        signals.setup_logging.connect(self._logging, weak=False)
        signals.worker_shutdown.connect(self._stop, weak=False)

    def context(self) -> Runtime:
        if self.ctx is None:
            raise FleetError(ErrorCode.MODEL_UNAVAILABLE, "worker context is not built yet (models not loaded)")
        return self.ctx

    def run(self) -> None:
        self.app.worker_main(self.argv)

    def _start(self, sender: Any = None, **_: object) -> None:
        settings = self.settings
        setup_tracing("autoglm-worker")
        CeleryInstrumentor().instrument()  # continues the producer's trace from the message headers
        self.ctx = build_runtime(settings, self.core)
        hostname = getattr(sender, "hostname", None) or f"autoglm-{os.getpid()}@{socket.gethostname()}"
        if self.ctx.engine.owner:  # one entry per worker: the first consumer's
            self.presence = Presence(settings, hostname, list(self.ctx.engine.models)).start()
        if self.ctx.engine.owner:  # webhooks leave from one event loop per worker, never a task thread
            self.deliverer = Deliverer(settings, settings.redis_url or "", hostname).start()
        if settings.worker.metrics_port and self.ctx.engine.owner:  # one /metrics per worker: the first consumer's
            metrics.serve(settings.worker.metrics_port, settings.redis_url or "", settings.all_queues(),
                          settings.worker.metrics_host, settings.broker.master_name)

    def _logging(self, **_: object) -> None:
        # Connecting here stops Celery from installing its own handlers: every line is ours (JSON).
        setup_logging(self.settings.worker.loglevel, self.settings.worker.log_format)

    def _stop(self, **_: object) -> None:
        if self.deliverer is not None:
            self.deliverer.stop()
        if self.presence is not None:
            self.presence.stop()
        if self.group is not None:
            self.group.stop()
        if self.ctx is not None:
            self.ctx.close()
