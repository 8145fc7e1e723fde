"""Start one worker process: broker (configured or embedded), models, Celery threads pool."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile

from shared.broker import broker_url
from shared.config import Settings, load_settings
from shared.telemetry import setup_logging

log = logging.getLogger(__name__)


def run_worker(concurrency: int | None = None, loglevel: str | None = None, hostname: str | None = None) -> None:
    settings = load_settings()
    setup_logging(loglevel or settings.worker.loglevel, settings.worker.log_format)
    if settings.worker.metrics_port and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before prometheus_client is imported: every consumer process (and the ones it starts)
        # counts into files here, and the first one serves their sum (workers/metrics.py).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="autoglm-metrics-")
        atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    with broker_url(settings.redis_url) as url:
        if not settings.redis_url:
            print(f"embedded broker running; point producers at it with REDIS_URL={url}", file=sys.stderr, flush=True)
        os.environ["REDIS_URL"] = url  # the worker app reads its settings from the environment
        if concurrency:
            os.environ["AUTOGLM_WORKER__CONCURRENCY"] = str(concurrency)
        from workers.app import app, settings as worker_settings

        app.worker_main(celery_argv(worker_settings, loglevel, hostname or f"autoglm-{os.getpid()}@%h"))


def celery_argv(settings: Settings, loglevel: str | None, hostname: str) -> list[str]:
    """`celery worker` arguments of a consumer (the extra consumers reuse them, workers/consumers.py)."""
    queues = sorted(settings.worker.queues, key=lambda p: settings.queues[p].priority)
    return [
        "worker",
        f"--loglevel={loglevel or settings.worker.loglevel}",
        "--queues=" + ",".join(settings.queue_name(p) for p in queues),
        f"--concurrency={settings.worker_concurrency}",
        f"--hostname={hostname}",
        "--without-mingle",
        "--without-gossip",
    ]


if __name__ == "__main__":
    run_worker()
