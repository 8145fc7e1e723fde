"""How a worker's processes start and end.

- The engine core starts first (``EngineCoreProcess``), before the consumer imports torch and
  Celery, so on a multi-core machine its imports and model load overlap the consumer's own start.
- They end with the one that started them (Linux PR_SET_PDEATHSIG): the engine core and a worker's extra
  consumers are children of its first consumer; if that one is killed (even with -9), the kernel
  signals them, so no orphan keeps a model or a queue.
- Quickly, once drained (``exit_drained``): interpreter finalization with torch, transformers and
  gptqmodel loaded took 1.5-3.5 s per process on a 2-core CPU, time every restart and deploy waited for.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field

from shared.config import Settings

PR_SET_PDEATHSIG = 1


def child_env(settings: Settings) -> dict[str, str]:
    """The environment of the processes a consumer starts (engine core, extra consumers): they load
    the same config, so only what this process was given beyond it travels (the broker URL, which
    may be an embedded server's, the log level, the thread count and the models to load)."""
    env = {**os.environ, "REDIS_URL": settings.redis_url or "", "AUTOGLM_WORKER__LOGLEVEL": settings.worker.loglevel}
    if settings.worker.concurrency:
        env["AUTOGLM_WORKER__CONCURRENCY"] = str(settings.worker.concurrency)
    if settings.worker.models:
        env["AUTOGLM_WORKER__MODELS"] = json.dumps(settings.worker.models)
    return env


# Every forward pass in the core runs in its serve loop's thread (continuous batching is stepped
# there too, workers/core/continuous.py), so libgomp keeps one thread pool. Were a second thread to run
# torch (a plugin's own thread, say), libgomp would count more pool threads than CPUs and throttle
# every pool's spin-wait from 300,000 to 100 turns; each of the many short parallel regions of a CPU
# forward pass then waits for sleeping threads (classification batches 236 ms instead of 160 on 2
# cores; bench/RESULTS.md). ACTIVE makes that throttled spin 1,000 (the most libgomp allows; still
# 1.3-1.6x slower than one pool, RESULTS.md "2026-12-02, evening"), and GOMP_SPINCOUNT keeps the
# unthrottled spin at its default instead of ACTIVE's 30 billion (an idle core would spin a core
# away). A safety net, then; the caller's own settings win.
OPENMP_WAIT = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


@dataclass
class EngineCoreProcess:
    """An engine core this consumer started and owns: ``python -m workers.core.loop ADDRESS PID``."""

    env: dict[str, str]
    address: str = field(default_factory=lambda: f"ipc://{tempfile.gettempdir()}/autoglm-core-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    process: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        """Start a core at this address (again, after one died); it loads the models, then answers hello."""
        self.process = subprocess.Popen([sys.executable, "-m", "workers.core.loop", self.address, str(os.getpid())],
                                        env={**OPENMP_WAIT, **self.env})
        return self.process


def set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when the thread that started it exits.
    False where the call is unavailable (not Linux/glibc)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        return False
    return True


def exit_drained(code: int | str | None = 0) -> None:
    """End this process after its work is drained: run the ``atexit`` hooks (span exporters flush,
    temp dirs go, logging closes), flush stdio, then leave without tearing down every module.
    Call it only when nothing is held in memory: answers are stored or replies sent, and whatever
    was not answered is still unacked in Redis, where it is redelivered."""
    if isinstance(code, str):  # SystemExit("message"): the interpreter would print it and exit 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # private but stable: the hooks a normal exit runs, without the module teardown
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)
