"""Prometheus metrics of one worker, served on ``worker.metrics_port`` (/metrics) by its first consumer.

A worker is several consumer processes (workers/consumer/group.py): with metrics on, each counts into
prometheus_client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by workers/main.py before
anything imports prometheus_client) and the first serves their sum, as gunicorn apps do. Queue
depth is read from Redis at scrape time (LLEN of each queue), so it reflects what is waiting right
now, across all workers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared import fairqueue

log = logging.getLogger(__name__)
MAX_ELAPSED_S = 31 * 86_400  # longer than any message is kept: not a wait, a broken clock


def elapsed_s(start: float, end: float) -> float:
    """``end - start`` in seconds when it is a plausible wait, else 0: a histogram sum that once
    takes an infinite (or 1e308) value stays so for the life of the process."""
    value = end - start
    return value if math.isfinite(value) and 0 < value <= MAX_ELAPSED_S else 0.0


TASKS = Counter("autoglm_tasks", "Tasks finished, by task type, outcome and error code", ["task_type", "outcome", "code"])
QUEUE_WAIT = Histogram("autoglm_queue_wait_seconds", "Producer submit to worker pick-up", ["queue"],
                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
BATCH_SIZE = Histogram("autoglm_batch_size", "Requests per model batch", ["task_type"],
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
BATCH_SECONDS = Histogram("autoglm_batch_seconds", "Model time per batch", ["task_type"],
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
CONTINUOUS_ROWS = Histogram("autoglm_continuous_rows", "Rows decoding together when a generation joined the "
                            "running batch (continuous batching)", ["task_type"],
                            buckets=(1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 256))
TOKENS = Counter("autoglm_tokens", "Tokens processed (rate() of it is tokens/s)", ["kind"])
MODEL_LOAD = Gauge("autoglm_model_load_seconds", "Time to load each model at worker start", ["model"],
                   multiprocess_mode="max")


class QueueDepth(Collector):
    """Depth of every (model, priority) queue: sum by ``model`` for a model's backlog."""

    def __init__(self, redis_url: str, queues: Sequence[tuple[str, str, str]], master_name: str | None = None) -> None:
        from shared.broker import redis_client

        self.client = redis_client(redis_url, outage_s=1.0, master_name=master_name)
        self.queues = list(queues)  # (queue, priority, model)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("autoglm_queue_depth", "Messages waiting in each queue",
                                   labels=["queue", "model", "priority"])
        for name, priority, model in self.queues:
            try:
                family.add_metric([name, model, str(priority)], float(fairqueue.queue_depth(self.client, name)))
            except Exception:  # noqa: BLE001 - a scrape must not fail because Redis blinked
                continue
        yield family


def serve(port: int, redis_url: str, queues: Sequence[tuple[str, str, str]], host: str = "127.0.0.1",
          master_name: str | None = None) -> None:
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # every consumer's counts, summed at scrape time
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    registry.register(QueueDepth(redis_url, queues, master_name))
    start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, port)


def observe_batch(task_type: str, size: int, input_tokens: int, answers: Sequence[Any]) -> None:
    BATCH_SIZE.labels(task_type).observe(size)
    TOKENS.labels("input").inc(input_tokens)
    TOKENS.labels("output").inc(sum(a.usage.completion_tokens for a in answers))
