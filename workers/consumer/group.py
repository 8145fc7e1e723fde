"""A worker's extra consumer processes: more Celery consumers feeding its one engine core.

Why processes, not threads: one consumer process does its message handling (Celery, validation,
tokenization, ledger, result writes) under one GIL, about 600 tasks/s with a zero-cost model on a
2-core EPYC, and its threads bound what is in flight; a GPU batch of 32 wants more (bench/RESULTS.md).
The first consumer (the one `python -m workers` starts) owns the engine core and starts
``worker.consumers - 1`` more right after the core, before its own imports: they import while the
model loads, and each, a `python -m workers` process that attaches to the core's address
(``worker.engine_address``), waits for the core's hello like the first. They die with it (PR_SET_PDEATHSIG: SIGTERM, a warm shutdown
whose waiting tasks are requeued) and it restarts any that die alone. A consumer killed with -9
loses nothing: its unacked messages are redelivered like any dead worker's (docs/reliability.md).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

from workers.lifecycle import set_parent_death_signal

log = logging.getLogger(__name__)


class ConsumerGroup:
    def __init__(self, address: str, count: int, hostname: str, env: dict[str, str]) -> None:
        """``count - 1`` more `python -m workers` processes attached to the core at ``address``,
        named ``name.N@host`` after the first consumer's ``hostname``, with ``env`` (its settings)."""
        self.address = address
        self.env = {**env, "AUTOGLM_WORKER__ENGINE_ADDRESS": address}
        name, _, host = hostname.partition("@")
        self.hostnames = [f"{name}.{i}@{host}" for i in range(1, count)]
        self.processes: dict[str, subprocess.Popen] = {}
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="consumer-group", daemon=True)

    def start(self) -> ConsumerGroup:
        self._watcher.start()  # spawns from its own long-lived thread (PDEATHSIG follows the thread)
        return self

    def _spawn(self, hostname: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers", "--hostname", hostname],
            # Runs in the child before exec: SIGTERM (a warm shutdown) when the watcher thread exits.
            env=self.env, preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM),  # noqa: PLW1509 - prctl only
        )
        log.info("consumer %s started (pid %d) on engine core %s", hostname, process.pid, self.address)
        return process

    def _watch(self) -> None:
        for hostname in self.hostnames:
            self.processes[hostname] = self._spawn(hostname)
        while not self._stopping.wait(0.5):
            for hostname, process in list(self.processes.items()):
                if process.poll() is not None and not self._stopping.is_set():
                    log.error("consumer %s (pid %d) exited with %s; restarting it",
                              hostname, process.pid, process.returncode)
                    self.processes[hostname] = self._spawn(hostname)
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> None:
        """Warm shutdown of every extra consumer (they finish or requeue what they hold)."""
        self._stopping.set()
        self._watcher.join(5)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
