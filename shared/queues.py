"""Celery wiring both sides share: queue declarations, routing by priority, serialisation.

Producers publish by task *name* through an app built here, so they never import worker code
(torch, transformers). Workers build their app from the same function and add worker settings.

Queues are per (model, priority), named ``<priority queue>.<model>`` (``interactive.smollm2-135m``):
a worker consumes the queues of the models it loaded, so requests only reach workers that can
answer them, and the producer routes by the request's model (docs/architecture.md "Several models").
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue
from kombu.transport import TRANSPORT_ALIASES

from shared.broker import is_sentinel
from shared.config import Settings
from shared.task_types import CLASSIFY_TASK, GENERATE_TASK  # noqa: F401 - the task names, for callers of this module

WEBHOOK_TASK = "autoglm.webhook"


def declared_queues(settings: Settings) -> list[Queue]:
    """One direct exchange + routing key per queue, declared explicitly (see FACTS.md: an undeclared
    exchange silently bound both queues to the app's default key)."""
    return [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in settings.declared_queue_names()]


def use_sentinel_transport(path: str) -> None:
    """Make ``sentinel://`` mean this transport in this process. kombu fails over between the ``;``
    parts of a Sentinel URL by parsing the next part afresh, and the scheme then picks the transport
    again: stock kombu's, without the fair queues, the submitted marker or the reliable fetch (seen:
    the first publish after a master's failover skipped them all)."""
    TRANSPORT_ALIASES["sentinel"] = path


def make_celery(settings: Settings, redis_url: str, name: str = "autoglm") -> Celery:
    backend = redis_url
    if settings.broker.min_replicas_acked:  # stored states wait for replicas too (shared/result_backend.py)
        kind = "ReplicatedSentinelBackend" if is_sentinel(redis_url) else "ReplicatedRedisBackend"
        backend = f"shared.result_backend:{kind}+{redis_url}"
    app = Celery(name, broker=redis_url, backend=backend)
    # Bulk queues keep one list per tenant, served round-robin (shared/fairqueue.py); workers use a
    # subclass of the same channel (workers/consumer/transport.py).
    sentinel = is_sentinel(redis_url)
    app.conf.broker_transport = "shared.fairqueue:SentinelTransport" if sentinel else "shared.fairqueue:Transport"
    if sentinel:
        use_sentinel_transport(app.conf.broker_transport)
    master = {"master_name": settings.broker.master_name} if sentinel else {}
    interactive = settings.queue_name(settings.queue_classes()[0].priority)
    app.conf.update(
        task_queues=declared_queues(settings),
        task_default_queue=interactive,
        task_default_exchange=interactive,
        task_default_routing_key=interactive,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=settings.broker.result_expires_s,
        result_extended=True,
        task_track_started=True,
        # Redis lists are polled in the order the worker lists its queues: interactive first.
        broker_transport_options={
            "queue_order_strategy": "priority",
            "visibility_timeout": settings.broker.visibility_timeout_s,
            # Sweep for messages a dead worker left unacked every restore_interval_s (kombu's
            # default is ~100 s whatever the visibility timeout): redelivery bound =
            # visibility_timeout_s + restore_interval_s once any worker is running.
            "unacked_restore_interval": settings.broker.restore_interval_s,
            "unacked_restore_throttle": 1,
            "fair_queues": tuple(settings.bulk_queues()),
            "submitted_ttl_s": settings.broker.result_expires_s,
            "min_replicas_acked": settings.broker.min_replicas_acked,
            "replica_ack_timeout_s": settings.broker.replica_ack_timeout_s,
            **master,
        },
        # Publishing is retried once, by the producer's tenacity policy (producers/client.py).
        task_publish_retry=False,
        # Result writes survive a Redis restart: retried until the broker is back.
        result_backend_always_retry=True,
        result_backend_max_retries=20,
        result_backend_transport_options={"visibility_timeout": settings.broker.visibility_timeout_s,
                                          **master},
        broker_connection_retry_on_startup=True,
        autoglm_min_replicas_acked=settings.broker.min_replicas_acked,
        autoglm_replica_ack_timeout_s=settings.broker.replica_ack_timeout_s,
    )
    return app
