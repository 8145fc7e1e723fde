"""`python -m workers`: one worker (engine core + consumer processes), or one extra consumer.

Settings come from config + environment once, here; what the command line or an embedded broker
adds is applied to that settings object, not written back into ``os.environ`` (the processes this
one starts get it in their own environment: workers/lifecycle.py ``child_env``).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile

from pydantic import ValidationError

from shared.broker import broker_url
from shared.config import Settings, load_settings
from shared.errors import invalid_input
from shared.telemetry import setup_logging
from workers.lifecycle import EngineCoreProcess, child_env, exit_drained

log = logging.getLogger(__name__)


def run_worker(concurrency: int | None = None, loglevel: str | None = None, hostname: str | None = None,
               models: list[str] | None = None) -> None:
    try:
        settings = load_settings().on_device()
    except ValidationError as exc:  # fail before any process starts, with the field named
        raise SystemExit(f"error INVALID_INPUT: config: {invalid_input(exc).message}") from None
    given = {k: v for k, v in {"concurrency": concurrency, "loglevel": loglevel, "models": models}.items() if v}
    if given:
        settings = settings.model_copy(update={"worker": settings.worker.model_copy(update=given)})
    unknown = sorted(set(models or []) - {m.name for m in settings.models})
    if unknown:
        raise SystemExit(f"--models names unknown models {unknown}; configured: {[m.name for m in settings.models]}")
    setup_logging(settings.worker.loglevel, settings.worker.log_format)
    if settings.worker.metrics_port and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # prometheus_client reads this once, at import: every consumer process (this one and those
        # it starts, which inherit it) counts into files here; the first serves their sum.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="autoglm-metrics-")
        atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    with broker_url(settings.redis_url, settings.broker.master_name) as url:
        if not settings.redis_url:
            print(f"embedded broker running; point producers at it with REDIS_URL={url}", file=sys.stderr, flush=True)
        settings = settings.model_copy(update={"redis_url": url})
        from celery.utils.nodenames import default_nodename, host_format

        name = host_format(default_nodename(hostname or f"autoglm-{os.getpid()}@%h"))  # as `celery worker` reads it
        core = group = None
        if not settings.worker.engine_address:  # this consumer owns the worker's engine core: start it
            core = EngineCoreProcess(child_env(settings))  # now, so its model loads while Celery imports here
            core.start()
            if settings.worker_consumers > 1:  # now too: they import and start while the model loads, then attach
                from workers.consumer.group import ConsumerGroup

                group = ConsumerGroup(core.address, settings.worker_consumers, name, core.env).start()
        from workers.consumer.app import ConsumerProcess

        try:
            ConsumerProcess(settings, celery_argv(settings, name), core, group).run()
        except SystemExit as stopped:  # Celery's worker ends by sys.exit once warm shutdown is done
            code = stopped.code
        else:
            code = 0
    exit_drained(code)  # tasks acked or left unacked, the engine core and any embedded broker stopped


def celery_argv(settings: Settings, hostname: str) -> list[str]:
    """`celery worker` arguments of a consumer."""
    return [
        "worker",
        f"--loglevel={settings.worker.loglevel}",
        "--queues=" + ",".join(settings.worker_queues()),
        f"--concurrency={settings.consumer_threads}",
        f"--hostname={hostname}",
        "--without-mingle",
        "--without-gossip",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=None, help="Celery threads (default: the largest batch)")
    parser.add_argument("--loglevel", default=None)
    parser.add_argument("--hostname", default=None, help="Celery node name (default autoglm-PID@host)")
    parser.add_argument("--models", default=None, help="comma-separated model aliases to load (default: worker.models, else all)")
    args = parser.parse_args(argv)
    run_worker(args.concurrency, args.loglevel, args.hostname, args.models.split(",") if args.models else None)


if __name__ == "__main__":
    main()
