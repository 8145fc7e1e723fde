"""Start one worker process: broker (configured or embedded), models, Celery threads pool."""

from __future__ import annotations

import logging
import os
import sys

from shared.broker import broker_url
from shared.config import load_settings
from shared.telemetry import setup_logging

log = logging.getLogger(__name__)


def run_worker(concurrency: int | None = None, loglevel: str | None = None, hostname: str | None = None) -> None:
    settings = load_settings()
    setup_logging(loglevel or settings.worker.loglevel, settings.worker.log_format)
    with broker_url(settings.redis_url) as url:
        if not settings.redis_url:
            print(f"embedded broker running; point producers at it with REDIS_URL={url}", file=sys.stderr, flush=True)
        os.environ["REDIS_URL"] = url  # the worker app reads its settings from the environment
        if concurrency:
            os.environ["AUTOGLM_WORKER__CONCURRENCY"] = str(concurrency)
        from workers.app import app, settings as worker_settings

        queues = sorted(worker_settings.worker.queues, key=lambda p: worker_settings.queues[p].priority)
        argv = [
            "worker",
            f"--loglevel={loglevel or worker_settings.worker.loglevel}",
            "--queues=" + ",".join(worker_settings.queue_name(p) for p in queues),
            f"--concurrency={worker_settings.worker_concurrency}",
            f"--hostname={hostname or f'autoglm-{os.getpid()}@%h'}",
            "--without-mingle",
            "--without-gossip",
        ]
        app.worker_main(argv)


if __name__ == "__main__":
    run_worker()
