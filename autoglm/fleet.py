"""Run a local fleet for a command's lifetime: broker (configured or embedded) + worker processes.

Used by `autoglm demo` and the integration tests, so both exercise the same real parts a deployment
runs: a Redis server, `python -m workers` processes, and producers talking to them over the network.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from celery import Celery

from shared.errors import ErrorCode, FleetError


def _consumers(env: dict[str, str]) -> int:
    """How many consumer processes a worker started with ``env`` runs: its settings as the child will
    read them (config file, env, the device's default). Waiting for fewer let a bench measure while the
    other consumers were still starting (seconds of imports and loading on the same cores)."""
    from shared.config import load_settings

    try:
        return load_settings(environ=env).worker_consumers
    except Exception:  # noqa: BLE001 - the child will say what is wrong with its settings
        return 1


class WorkerProcess:
    """One `python -m workers` child with its log in a file (tail shown if it fails to start)."""

    def __init__(self, redis_url: str, env: dict[str, str] | None = None, concurrency: int | None = None) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="autoglm-worker-", suffix=".log")[1])
        child_env = {**os.environ, **(env or {}), "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
        if concurrency:
            child_env["AUTOGLM_WORKER__CONCURRENCY"] = str(concurrency)
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers"], env=child_env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.hostname_prefix = f"autoglm-{self.process.pid}"
        # Its extra consumer processes answer pings as autoglm-PID.N@host (workers/consumer/group.py).
        self.consumers = _consumers(child_env)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, app: Celery, timeout: float = 600.0) -> None:
        """Block until this worker's consumers all answer a control ping (models are loaded by then)."""
        deadline = time.monotonic() + timeout
        host = socket.gethostname()  # Celery's %h
        expected = [f"{self.hostname_prefix}@{host}"] + [f"{self.hostname_prefix}.{n}@{host}" for n in range(1, self.consumers)]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            # Asked by name, the ping returns as soon as they all answer (kombu sets the reply limit to
            # the number of destinations); a ping to all waits out its whole timeout on every poll.
            replies = app.control.ping(destination=expected, timeout=0.5) or []
            if set(expected) <= {name for reply in replies for name in reply}:
                return
        raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"worker not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (finish running tasks), then kill if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._log.close()


@contextlib.contextmanager
def running_worker(
    app: Celery, redis_url: str, env: dict[str, str] | None = None, concurrency: int | None = None
) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(redis_url, env=env, concurrency=concurrency)
    try:
        worker.wait_ready(app)
        yield worker
    finally:
        worker.stop()
