"""Start and stop the competitors' real parts for a benchmark run: broker, fleet workers, naive worker."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from celery import Celery

from producers.client import FleetClient
from producers.fleet import WorkerProcess
from shared.config import Settings, load_settings


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def wait_all(handles: Sequence, timeout: float = 3600) -> list:
    return [h.result(timeout=timeout) for h in handles]


class Harness:
    """One broker for the whole run; every competitor gets queues of its own."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.run_id = uuid.uuid4().hex[:6]

    def queues(self, tag: str) -> dict[str, dict]:
        return {
            "interactive": {"name": f"bench-{self.run_id}-{tag}-interactive", "priority": 0},
            "bulk": {"name": f"bench-{self.run_id}-{tag}-bulk", "priority": 1},
        }

    def client(self, tag: str) -> FleetClient:
        settings = load_settings(redis_url=self.redis_url, queues=self.queues(tag))
        return FleetClient(self.redis_url, settings)

    @contextlib.contextmanager
    def fleet(self, tag: str, workers: int = 1, env: dict[str, str] | None = None) -> Iterator[FleetClient]:
        """``workers`` real `python -m workers` processes on this tag's queues, and a client for them."""
        client = self.client(tag)
        child_env = {"AUTOGLM_QUEUES": json.dumps(self.queues(tag)), "AUTOGLM_WORKER__LOGLEVEL": "WARNING", **(env or {})}
        procs = [WorkerProcess(self.redis_url, env=child_env) for _ in range(workers)]
        try:
            for proc in procs:
                proc.wait_ready(client.app)
            yield client
        finally:
            for proc in procs:
                proc.stop()
            self.purge(client.app, [q["name"] for q in self.queues(tag).values()])
            client.close()

    @contextlib.contextmanager
    def naive(self) -> Iterator[tuple[Celery, str]]:
        """The naive baseline worker (bench/naive.py, solo pool) and the queue it consumes."""
        from bench.naive import app

        queue = f"bench-{self.run_id}-naive"
        log = Path(tempfile.mkstemp(prefix="autoglm-naive-", suffix=".log")[1])
        hostname = f"naive-{self.run_id}@%h"
        env = {**os.environ, "REDIS_URL": self.redis_url}
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bench.naive", "worker", "--pool", "solo", "-Q", queue,
                 "--hostname", hostname, "--loglevel", "WARNING", "--without-mingle", "--without-gossip"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )
            try:
                app.send_task("naive.warmup", queue=queue).get(timeout=600)
                yield app, queue
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                self.purge(app, [queue])

    @staticmethod
    def purge(app: Celery, queues: Sequence[str]) -> None:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            for name in queues:
                with contextlib.suppress(Exception):
                    channel.queue_purge(name)


def timed(fn, *args, **kwargs) -> tuple[float, object]:  # noqa: ANN001
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - started, value
