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
from typing import Any

from celery import Celery

from autoglm.fleet import WorkerProcess
from producers.client import FleetClient
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

    def __init__(self, settings: Settings, redis_url: str, env: dict[str, str] | None = None) -> None:
        """``env``: settings every child (fleet and naive workers) gets, e.g. the model and batch
        sizes of a ``--shape`` run; ``settings`` must hold the same values for this side."""
        self.settings = settings
        self.redis_url = redis_url
        self.env = dict(env or {})
        self.run_id = uuid.uuid4().hex[:6]

    def queues(self, tag: str) -> dict[str, dict]:
        return {
            "interactive": {"name": f"bench-{self.run_id}-{tag}-interactive", "rank": 0},
            "bulk": {"name": f"bench-{self.run_id}-{tag}-bulk", "rank": 1},
        }

    def client(self, tag: str, models: list[dict] | None = None, **overrides: Any) -> FleetClient:
        """A producer on this tag's queues; ``overrides``: more settings fields (e.g. ``broker``)."""
        if models is None and "AUTOGLM_MODELS" in self.env:
            models = json.loads(self.env["AUTOGLM_MODELS"])  # a --shape run: route to the model its workers load
        extra = {"models": models} if models is not None else {}
        settings = load_settings(redis_url=self.redis_url, queues=self.queues(tag), **extra, **overrides)
        return FleetClient(self.redis_url, settings)

    @contextlib.contextmanager
    def fleet(self, tag: str, workers: int = 1, env: dict[str, str] | None = None,
              models: list[dict] | None = None) -> Iterator[FleetClient]:
        """``workers`` real `python -m workers` processes on this tag's queues, and a client for them
        (``models``: the model list both sides use instead of the configured one)."""
        client = self.client(tag, models)
        child_env = {**self.env, "AUTOGLM_QUEUES": json.dumps(self.queues(tag)), "AUTOGLM_WORKER__LOGLEVEL": "WARNING",
                     **(env or {})}
        if models is not None:
            child_env["AUTOGLM_MODELS"] = json.dumps(models)
        procs = [WorkerProcess(self.redis_url, env=child_env) for _ in range(workers)]
        self.worker_pids = [p.process.pid for p in procs]
        try:
            for proc in procs:
                proc.wait_ready(client.app)
            yield client
        finally:
            for proc in procs:
                proc.stop()
            self.purge(client.app, client.settings.declared_queue_names())
            client.close()

    @contextlib.contextmanager
    def naive(self, env: dict[str, str] | None = None) -> Iterator[tuple[Celery, str]]:
        """The naive baseline worker (bench/naive.py, solo pool) and the queue it consumes."""
        from bench.naive import app

        with self._celery_worker("bench.naive", "naive", ["--pool", "solo"], {**self.env, **(env or {})}) as queue:
            app.send_task("naive.warmup", queue=queue).get(timeout=600)
            yield app, queue

    @contextlib.contextmanager
    def floor(self, concurrency: int) -> Iterator[tuple[Celery, str, int]]:
        """The plain Celery echo worker (bench/floor.py, threads pool), its queue and its pid."""
        from bench.floor import app

        with self._celery_worker("bench.floor", "floor", ["--pool", "threads", f"--concurrency={concurrency}"]) as queue:
            app.send_task("floor.echo", args=[{}], queue=queue).get(timeout=120)
            yield app, queue, self._last_pid

    @contextlib.contextmanager
    def _celery_worker(self, module: str, tag: str, pool: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
        queue = f"bench-{self.run_id}-{tag}"
        log = Path(tempfile.mkstemp(prefix=f"autoglm-{tag}-", suffix=".log")[1])
        hostname = f"{tag}-{self.run_id}@%h"
        child_env = {**os.environ, "REDIS_URL": self.redis_url, **(env or {})}
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", module, "worker", *pool, "-Q", queue,
                 "--hostname", hostname, "--loglevel", "WARNING", "--without-mingle", "--without-gossip"],
                env=child_env, stdout=out, stderr=subprocess.STDOUT,
            )
            self._last_pid = proc.pid
            try:
                yield queue
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                from bench.floor import app

                self.purge(app, [queue])

    @staticmethod
    def purge(app: Celery, queues: Sequence[str]) -> None:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            for name in queues:
                with contextlib.suppress(Exception):
                    channel.queue_purge(name)


def descendants(pids: Sequence[int]) -> list[int]:
    """These processes and every live process below them (a worker's engine core and extra consumers)."""
    found: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                todo += [int(c) for c in children.read_text().split()]
    return found


def _cpu_s(pid: int, reaped_children: bool = False) -> float:
    """One process's user + system CPU seconds so far (with ``reaped_children``: plus those of the
    children it has waited for, cutime + cstime); 0 once it is gone."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11 : 15 if reaped_children else 13]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time used so far by these processes and all their descendants (Linux /proc;
    live children are counted directly: a process's cutime only covers children it has reaped)."""
    return sum(_cpu_s(pid, reaped_children=True) for pid in descendants(pids))


def cpu_by_role(pids: Sequence[int]) -> dict[str, float]:
    """CPU seconds so far of a fleet's engine core(s) and of its consumer processes, apart: which
    side saturates shows who limits the fleet (a consumer-bound fleet reads ~N busy consumers)."""
    roles = {"core": 0.0, "consumers": 0.0}
    for pid in descendants(pids):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            role = "core" if b"workers.core.loop" in Path(f"/proc/{pid}/cmdline").read_bytes() else "consumers"
            roles[role] += _cpu_s(pid)
    return roles


def timed(fn, *args, **kwargs) -> tuple[float, object]:  # noqa: ANN001
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - started, value
